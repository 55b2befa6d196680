"""kerasdet.zoo: the model registry (`list`, `info`, `load`) and its weights store.

    import kerasdet
    kerasdet.zoo.list()                                # names of all entries
    kerasdet.zoo.info("faster_rcnn_r50_fpn")            # architecture, data, weights, metrics
    model = kerasdet.zoo.load("faster_rcnn_tiny_fpn_synthetic")   # built, with verified weights
"""
import builtins
import copy
import os
import warnings

from kerasdet.zoo.registry import UnknownModelError, ZooEntry, entries, get_entry, zoo_dir
from kerasdet.weights_files import WeightsError, WeightsHashError, load_verified_weights, sha256_of
from kerasdet.zoo.weights import cache_dir, resolve_weights_file

__all__ = ["list", "info", "load", "build", "input_settings", "ZooEntry", "UnknownModelError",
           "NotImplementedYetError", "RandomWeightsWarning", "WeightsError", "WeightsHashError",
           "cache_dir", "sha256_of", "zoo_dir"]


class NotImplementedYetError(NotImplementedError):
    """The entry's model class is not written yet."""


class RandomWeightsWarning(UserWarning):
    """A model was built without trained weights."""


def list(family=None, with_weights=None):  # noqa: A001 - the public name the design asks for
    """Sorted entry names, optionally only one family or only entries with (or without) weights."""
    names = []
    for name, entry in entries().items():
        if family is not None and entry.family != family:
            continue
        if with_weights is not None and entry.has_weights != bool(with_weights):
            continue
        names.append(name)
    return sorted(names)


def info(name):
    """A dict describing an entry: class, arguments, data set, input, weights, metrics, status."""
    from kerasdet.zoo.classes import named_classes

    entry = get_entry(name)
    return {
        "name": entry.name, "family": entry.family, "class": entry.class_path,
        "arguments": copy.deepcopy(entry.arguments), "dataset": entry.dataset,
        "class_names": builtins.list(named_classes(entry.class_names)), "input": dict(entry.input),
        "weights": dict(entry.weights) if entry.weights else None,
        "metrics": copy.deepcopy(entry.metrics), "published_metrics": copy.deepcopy(entry.published_metrics),
        "weights_kind": entry.weights_kind(), "pretrained_backbone": entry.pretrained_backbone,
        "pretrained_backbone_new_layers": builtins.list(entry.pretrained_backbone_new_layers),
        "pretrained_parts": builtins.list(entry.pretrained_parts),
        "command": entry.command,
        "recipe": copy.deepcopy(entry.recipe), "notes": entry.notes, "status": entry.status(),
        "config_file": entry.source_file,
    }


def input_settings(name_or_model):
    """The entry's input settings ({"image_size": [H, W]} or {"min_size", "max_size"}, "stride")."""
    if isinstance(name_or_model, str):
        return dict(get_entry(name_or_model).input)
    settings = getattr(name_or_model, "kerasdet_input", None)
    return dict(settings) if settings else None


def build(name, num_classes=None, **overrides):
    """Builds the entry's architecture with random weights (no warning; see `load`)."""
    entry = get_entry(name)
    try:
        cls = entry.model_class()
    except (ImportError, AttributeError) as error:
        raise NotImplementedYetError(f"zoo entry {name!r}: its model class {entry.class_path} is "
                                     f"not implemented yet ({error})") from error
    arguments = copy.deepcopy(entry.arguments)
    if num_classes is not None:
        arguments["num_classes"] = int(num_classes)
    arguments.update(overrides)
    model = cls(**arguments)
    input_size = entry.input.get("image_size")
    model.build((1, *(input_size or (64, 64)), 3))
    # Part of the model's config from here on: export, predict and evaluation resize by this rule.
    model.input_settings = dict(entry.input)
    from kerasdet.zoo.classes import named_classes

    names = named_classes(entry.class_names)
    if len(names) == model.num_classes:  # another class count (num_classes=...) has no names yet
        model.class_names = names
    model.kerasdet_entry = name
    return model


def load(name, weights="default", num_classes=None, pretrained_backbone=None, **overrides):
    """Builds a zoo model, ready for predict and fit.

    Args:
      name: entry name (``list()``).
      weights: "default" (the entry's published weights, fetched and sha256-verified; a published
        PyTorch checkpoint is converted on first load and cached, see kerasdet.zoo.pretrained; an entry
        without any builds with random weights and warns), None (random weights), or the path of a
        .weights.h5 file.
      num_classes: another number of classes than the entry's. With default weights, every layer
        whose shape still fits is loaded and the class-dependent output layers stay random.
      pretrained_backbone: for entries without trained detector weights that name a pretrained
        backbone (zoo/backbones.json): None (default) loads it when ``weights="default"`` and it
        is available offline, warning otherwise; True requires it (BackboneWeightsUnavailable
        says how to get it); False never loads it.
      overrides: further constructor arguments (e.g. score_threshold=0.3).

    The model's ``kerasdet_backbone_weights`` tells which backbone weights it started from (None
    for random).
    """
    entry = get_entry(name)
    model = build(name, num_classes=num_classes, **overrides)
    model.kerasdet_backbone_weights = None
    if weights is None:
        if pretrained_backbone:
            _start_from_pretrained_backbone(model, entry, pretrained_backbone)
        return model
    if weights == "default" and not entry.has_weights:
        started = _start_from_pretrained_backbone(model, entry, pretrained_backbone)
        warnings.warn(f"zoo entry {name!r} has no trained detector weights yet: "
                      + (_pretrained_module().start_message(started) if started
                         else "the model has random weights")
                      + " (see kerasdet.zoo.info(name)['status'])", RandomWeightsWarning, stacklevel=2)
        return model
    if weights == "default" and entry.converts_checkpoint:
        from kerasdet.zoo import pretrained

        path = pretrained.detector_weights_file(entry)
        if num_classes is not None and int(num_classes) != int(entry.arguments.get("num_classes", -1)):
            return _load_matching(model, path)
        return load_verified_weights(model, path)
    if weights == "default":
        path = resolve_weights_file(entry.weights["url"], entry.weights["sha256"],
                                    entry.weights.get("file"), base_dir=os.path.dirname(entry.source_file))
        if num_classes is not None and int(num_classes) != int(entry.arguments.get("num_classes", -1)):
            return _load_matching(model, path)
        return load_verified_weights(model, path)
    path = os.fspath(weights)
    return load_verified_weights(model, path)


def _pretrained_module():
    from kerasdet.zoo import pretrained

    return pretrained


def _start_from_pretrained_backbone(model, entry, pretrained_backbone):
    """Loads the entry's pretrained backbone into ``model.backbone`` as the caller asked; returns its
    name, or None when none was loaded."""
    from kerasdet.backbones.resnet import ResNetConv5Head
    from kerasdet.zoo import pretrained

    if pretrained_backbone is False or not entry.pretrained_backbone:
        if pretrained_backbone is True:
            raise ValueError(f"zoo entry {entry.name!r} names no pretrained backbone")
        return None
    name = entry.pretrained_backbone
    # The C4 designs run the backbone's last stage as their box head (CC-Net: one copy per cascade
    # stage): each copy starts from the same network.
    parts = [part for part in model.layers if isinstance(part, ResNetConv5Head)]
    parts += [getattr(model, attribute) for attribute in entry.pretrained_parts]
    if pretrained_backbone is None:
        available, reason = pretrained.availability(name)
        if available:
            try:
                pretrained.load_backbone_weights(model.backbone, name, parts, entry.pretrained_backbone_new_layers)
            except pretrained.BackboneWeightsUnavailable as error:  # e.g. offline: the URL did not answer
                available, reason = False, str(error)
        if not available:
            warnings.warn(f"{reason} -- {entry.name!r} starts from a random backbone", RandomWeightsWarning,
                          stacklevel=3)
            return None
    else:
        pretrained.load_backbone_weights(model.backbone, name, parts, entry.pretrained_backbone_new_layers)
    model.kerasdet_backbone_weights = name
    return name


def _load_matching(model, path):
    """Loads the weights whose shapes fit (backbone, RPN, shared heads), skipping class layers."""
    donor_name = getattr(model, "kerasdet_entry")
    donor = build(donor_name)
    load_verified_weights(donor, path)
    skipped = 0
    for target, source in zip(model.weights, donor.weights):
        # Both models are built from the same code in the same order, so the i-th variables
        # correspond; only their auto-numbered layer names differ.
        if tuple(target.shape) == tuple(source.shape):
            target.assign(source)
        else:
            skipped += 1
    warnings.warn(f"{skipped} weight arrays did not fit the new number of classes and stay random",
                  RandomWeightsWarning, stacklevel=3)
    return model
