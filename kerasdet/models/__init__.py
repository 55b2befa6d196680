"""The detectors: one thin module per paper, all subclasses of `kerasdet.models.base.Detector`.

Each class loads on first use (`kerasdet.models.MaskRCNN`), so importing one detector does not
build the modules of the others.
"""
import importlib

_CLASSES = {
    "Detector": "kerasdet.models.base",
    "FastRCNN": "kerasdet.models.fast_rcnn",
    "FasterRCNN": "kerasdet.models.faster_rcnn",
    "MaskRCNN": "kerasdet.models.mask_rcnn",
    "CascadeRCNN": "kerasdet.models.cascade_rcnn",
    "RFCN": "kerasdet.models.rfcn",
    "DeformableFasterRCNN": "kerasdet.models.deformable",
}

__all__ = sorted(_CLASSES)


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'kerasdet.models' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_CLASSES))
