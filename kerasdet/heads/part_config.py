"""Settings stated once: each part of a detector keeps its settings in a frozen dataclass, and a
detector's flat keyword arguments (what zoo entries, converters and `get_config` use) are the
dataclass fields with the part's prefix: ``RPNConfig.nms_iou`` is the argument ``rpn_nms_iou``.
Adding a setting is adding a field; the constructor, `get_config` and `from_config` follow.
"""
import dataclasses

__all__ = ["part_config", "read_settings", "flat_settings"]


def part_config(prefix="", attribute=None):
    """Class decorator: a frozen dataclass whose fields are flat arguments ``prefix + name``; a
    detector holds it as ``attribute`` (default ``prefix + "config"``)."""
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.prefix = prefix
        cls.attribute = attribute or prefix + "config"
        return cls
    return wrap


def _plain(value):
    # JSON-friendly values for get_config (tuples become lists, also nested ones).
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _frozen(value):
    # One spelling for sequences (JSON gives lists, code writes tuples), so configs compare equal.
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def read_settings(config_classes, kwargs, defaults=None, fixed=None, excluded=(), owner=""):
    """{config class: instance} from the flat arguments in `kwargs` (popped from it).

    `defaults`: a detector's own defaults for flat names; `fixed`: flat names the detector sets
    itself (another value is an error); `excluded`: flat names that do not apply (an error when
    given; the field keeps its default).
    """
    defaults, fixed = defaults or {}, fixed or {}
    configs = {}
    for cls in config_classes:
        values = {}
        for field in dataclasses.fields(cls):
            flat = cls.prefix + field.name
            if flat in excluded and flat in kwargs:
                raise ValueError(f"{owner}: argument `{flat}` does not apply to this detector.")
            if flat in fixed:
                if flat in kwargs and _plain(kwargs.pop(flat)) != _plain(fixed[flat]):
                    raise ValueError(f"{owner} fixes `{flat}={fixed[flat]!r}`; do not pass "
                                     "another value.")
                values[field.name] = fixed[flat]
            elif flat in kwargs:
                values[field.name] = kwargs.pop(flat)
            elif flat in defaults:
                values[field.name] = defaults[flat]
        configs[cls] = cls(**{k: _frozen(v) for k, v in values.items()})
    return configs


def flat_settings(configs, skip=()):
    """The flat arguments of `configs` (an iterable of part configs), minus the names in `skip`."""
    flat = {}
    for config in configs:
        for field in dataclasses.fields(config):
            name = config.prefix + field.name
            if name not in skip:
                flat[name] = _plain(getattr(config, field.name))
    return flat
