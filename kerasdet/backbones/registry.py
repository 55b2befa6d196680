"""Name -> constructor registry of the backbones (`kerasdet.backbones.get` / `list`)."""
import builtins

_REGISTRY = {}


def register(name, factory=None):
    """Registers ``factory(**kwargs) -> Backbone`` under ``name``; usable as a decorator."""
    def _add(fn):
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn
    return _add(factory) if factory is not None else _add


def get(name, **kwargs):
    """Builds the backbone registered as ``name`` with the given constructor arguments."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_names())}")
    return _REGISTRY[name](**kwargs)


def list_names():
    """Sorted names of the registered backbones."""
    return sorted(builtins.list(_REGISTRY))
