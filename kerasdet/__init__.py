"""kerasdet: the object-detection lineage from OverFeat to Cascade R-CNN as a Keras 3 model zoo."""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "atomic_files", "backbones", "converters", "data", "engine", "evaluation", "export", "heads", "layers",
    "losses", "models", "necks", "numpy_boxes", "ops", "visualize", "weights_files", "zoo",
)
# Top-level shortcuts: name -> (module, attribute).
_SHORTCUTS = {"export_saved_model": ("kerasdet.export", "export_saved_model"),
              "load_model": ("kerasdet.models", "load_model")}


def __getattr__(name):
    # Submodules load on first use so that `import kerasdet` stays cheap and a tool that needs only
    # the evaluation code does not pay for building the kernels' Python side.
    if name in _SUBMODULES:
        return importlib.import_module(f"kerasdet.{name}")
    if name in _SHORTCUTS:
        module, attribute = _SHORTCUTS[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'kerasdet' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_SHORTCUTS))
