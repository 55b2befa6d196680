"""What a run's MODEL names -- a zoo entry, a JSON config {"class", "arguments", "input"} or a .keras
file -- and the model, recipe and input settings a run takes from it."""
import importlib
import json
import os

import keras

# Imported for its registration: a .keras file saved with its optimizer names WarmupStepSchedule.
from kerasdet.engine import recipe as _recipe  # noqa: F401
from kerasdet.weights_files import load_verified_weights

__all__ = ["DEFAULT_INPUT", "is_zoo_name", "model_arguments", "entry_recipe", "from_scratch_backbone_config",
           "resolve_model", "input_settings_for", "describe_input", "give_data_to", "class_names_of"]

# The input settings of a model that carries none (Detectron's and torchvision's COCO sizes).
DEFAULT_INPUT = {"min_size": 800, "max_size": 1333}


def is_zoo_name(model_spec):
    """A zoo entry name has no file suffix (.json, .keras)."""
    return not os.path.splitext(os.fspath(model_spec))[1]


def _read_json_config(spec):
    with open(spec, encoding="utf-8") as handle:
        return json.load(handle)


def model_arguments(spec):
    """The constructor arguments a zoo entry name or JSON config builds with (None for a .keras file)."""
    if isinstance(spec, keras.Model) or os.fspath(spec).endswith(".keras"):
        return None
    if os.fspath(spec).endswith(".json"):
        return dict(_read_json_config(spec)["arguments"])
    from kerasdet import zoo

    return dict(zoo.registry.get_entry(spec).arguments)


def entry_recipe(model_spec):
    """The zoo entry's recipe (its batch size is the reference for learning-rate scaling); {} for a
    JSON config or .keras file (then TrainingRecipe.DEFAULTS)."""
    if not is_zoo_name(model_spec):
        return {}
    from kerasdet import zoo

    return zoo.info(model_spec)["recipe"]


def from_scratch_backbone_config(backbone, backbone_config=None):
    """The backbone settings for training a randomly initialised backbone: no frozen stage and
    trainable normalization. Freezing early stages and BatchNorm statistics is how pretrained
    ImageNet weights are fine-tuned; on random weights it leaves random layers and an identity
    "normalization" that never learn. Returns (config, description of what changed)."""
    config = dict(backbone_config or {})
    if backbone.startswith(("resnet", "mobilenet")):
        config.update(frozen_bn=False, freeze_at=0)
        return config, "every stage trainable, BatchNorm trainable (batch statistics)"
    if backbone.startswith("vgg"):
        config.update(freeze_blocks=0)
        return config, "every block trainable (VGG-16 has no normalization layers)"
    return config, "every layer trainable (this backbone has no frozen stages or normalization)"


def resolve_model(spec, weights="default", num_classes=None, pretrained_backbone=None, **overrides):
    """A model from a zoo entry name, a .keras file or a JSON config {"class", "arguments", "input"}.

    ``pretrained_backbone`` applies to zoo entries (see `kerasdet.zoo.load`); ``overrides`` are
    constructor arguments replacing the entry's or config's (e.g. anchor_sizes, backbone_config)."""
    from kerasdet import models, zoo

    if isinstance(spec, keras.Model):
        return spec
    spec = os.fspath(spec)
    if spec.endswith(".keras"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        if overrides:
            raise ValueError(f"{spec}: a .keras model is already built; {sorted(overrides)} cannot change")
        return models.load_model(spec)
    if spec.endswith(".json"):
        config = _read_json_config(spec)
        module_name, _, class_name = config["class"].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        arguments = dict(config["arguments"])
        arguments.update(overrides)
        if num_classes is not None:
            arguments["num_classes"] = num_classes
        model = cls(**arguments)
        settings = config.get("input") or None
        model.input_settings = dict(settings) if settings else None
        size = (settings or {}).get("image_size") or (64, 64)
        model.build((1, *size, 3))
        if weights not in (None, "default"):
            load_verified_weights(model, weights)
        return model
    return zoo.load(spec, weights=weights, num_classes=num_classes, pretrained_backbone=pretrained_backbone,
                    **overrides)


def input_settings_for(model_spec, min_size=None, max_size=None, image_size=None):
    """A run's input settings: the zoo entry's (or JSON config's) with ``min_size`` (one size, or
    several for multi-scale training), ``max_size`` or ``image_size`` [H, W] applied."""
    from kerasdet import zoo

    if is_zoo_name(model_spec):
        base = zoo.input_settings(model_spec)
    elif model_spec.endswith(".json"):
        base = _read_json_config(model_spec).get("input") or {}
    else:
        base = {}
    settings = dict(base or DEFAULT_INPUT)
    if image_size and (min_size or max_size):
        raise ValueError("give --image-size, or --min-size / --max-size, not both")
    if image_size:
        for key in ("min_size", "max_size", "min_size_test"):
            settings.pop(key, None)
        settings["image_size"] = list(image_size)
    if min_size:
        settings.pop("image_size", None)
        settings.pop("keep_aspect_ratio", None)
        settings.pop("min_size_test", None)
        settings["min_size"] = min_size[0] if len(min_size) == 1 else list(min_size)
    if max_size:
        if "min_size" not in settings:
            raise ValueError(f"--max-size applies to --min-size resizing; {model_spec} uses a fixed "
                             f"image_size {settings.get('image_size')} (give --min-size as well)")
        settings["max_size"] = max_size
    sizes = [*(min_size or ()), *([max_size] if max_size else ()), *(image_size or ())]
    if any(size < 1 for size in sizes):
        raise ValueError(f"--min-size / --max-size / --image-size must be positive, got {sizes}")
    return settings


def describe_input(settings):
    if settings.get("image_size"):
        return f"fixed {settings['image_size'][0]}x{settings['image_size'][1]}"
    text = f"shorter side {settings['min_size']}"
    return text + (f", longer side <= {settings['max_size']}" if settings.get("max_size") else "")


def give_data_to(model, class_names, input_settings):
    """Gives the model its class names and input settings (part of its config, so a .keras save keeps
    them)."""
    if class_names:
        model.class_names = tuple(class_names)
    if input_settings:
        model.input_settings = dict(input_settings)


def class_names_of(model, model_spec):
    """The model's class names; for a model that carries none, its zoo entry's (same count only)."""
    names = getattr(model, "class_names", None)
    if names or not is_zoo_name(model_spec):
        return list(names) if names else None
    from kerasdet import zoo

    names = zoo.info(model_spec)["class_names"]
    return names if len(names) == model.num_classes else None
