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
    "CCNet": "kerasdet.models.ccnet",
    "RFCN": "kerasdet.models.rfcn",
    "OverFeatDetector": "kerasdet.models.overfeat",
    "RCNN": "kerasdet.models.rcnn",
    "SPPNet": "kerasdet.models.sppnet",
    "RefineDet": "kerasdet.models.refinedet",
    "DeformableFasterRCNN": "kerasdet.models.deformable",
    "deformable_rfcn": "kerasdet.models.deformable",
}

__all__ = sorted(_CLASSES) + ["import_all", "load_model"]


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'kerasdet.models' has no attribute {name!r}")


def import_all():
    """Imports every detector module, registering its Keras serializable classes (what
    keras.saving.load_model needs to rebuild a detector from a .keras file)."""
    for module in set(_CLASSES.values()):
        importlib.import_module(module)


def load_model(path, **kwargs):
    """keras.saving.load_model for a .keras file holding any kerasdet detector."""
    import keras

    import_all()
    return keras.saving.load_model(path, **kwargs)


def __dir__():
    return sorted(list(globals()) + list(_CLASSES))
