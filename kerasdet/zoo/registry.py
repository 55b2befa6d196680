"""Reads the zoo's config files (one JSON file per detector family) into `ZooEntry` records.

Where the files are: KERASDET_ZOO_DIR if set, else the `zoo/` folder next to the package (a source
checkout or editable install), else `<sys.prefix>/share/kerasdet/zoo` (a wheel install ships them
there as data files).
"""
import dataclasses
import difflib
import importlib
import json
import os
import sys

__all__ = ["ZooEntry", "UnknownModelError", "zoo_dir", "entries", "get_entry"]

_REQUIRED = ("class", "arguments", "dataset", "class_names", "input")


class UnknownModelError(KeyError):
    """The name is not in the registry (the message suggests close names)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One zoo entry as written in its family file."""

    name: str
    family: str
    class_path: str            # "module:ClassName"
    arguments: dict            # constructor arguments (num_classes included)
    dataset: str
    class_names: object        # "coco" | "voc" | "synthetic:K" | list
    input: dict                # {"image_size": [H, W]} or {"min_size", "max_size"}; "stride"
    weights: dict | None       # {"url", "sha256", "file"}, a published checkpoint to convert ({"url",
                               # "sha256" or "sha256_prefix", "converter", "arch"}) or None (random)
    metrics: dict
    command: str | None
    recipe: dict
    notes: str
    source_file: str
    pretrained_backbone: str | None = None  # a zoo/backbones.json entry the backbone starts from
    # fnmatch patterns of the backbone's layers (or "<layer>/<weight path>") that have no counterpart in
    # the pretrained checkpoint and keep their initialization; stated in the entry with a "why".
    pretrained_backbone_new_layers: tuple = ()
    # Other parts of the detector (attribute names, e.g. "box_head") built from the same network
    # and started from the same weights.
    pretrained_parts: tuple = ()
    # Figures their publisher reports for published weights, with "source": never kerasdet's own
    # measurements, which are `metrics`.
    published_metrics: dict | None = None

    @property
    def has_weights(self):
        return bool(self.weights)

    @property
    def converts_checkpoint(self):
        """The weights are a published PyTorch checkpoint, converted on first load."""
        return bool(self.weights) and "converter" in self.weights

    def weights_kind(self):
        """"trained here", "published (<publisher>)", "pretrained backbone" or "random"."""
        if self.converts_checkpoint:
            return f"published ({self.weights.get('publisher', 'torchvision')})"
        if self.has_weights:
            return "trained here"
        if self.pretrained_backbone:
            return "pretrained backbone"
        return "random"

    def model_class(self):
        """The Keras model class, or raises ImportError / AttributeError when not written yet."""
        module_name, _, class_name = self.class_path.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def status(self):
        """"trained weights", "random weights (no trained weights published)" or
        "not implemented yet (...)"."""
        try:
            self.model_class()
        except (ImportError, AttributeError) as error:
            return f"not implemented yet ({self.class_path} is not available: {error})"
        if self.converts_checkpoint:
            return (f"published weights ({self.weights.get('publisher', 'torchvision')} checkpoint, converted "
                    "on first load)")
        if self.has_weights:
            return "trained weights"
        if self.pretrained_backbone:
            dataset = "ImageNet" if self.pretrained_backbone.endswith("_imagenet") else self.pretrained_backbone
            return (f"backbone pretrained ({dataset}: {self.pretrained_backbone}), detection layers random "
                    "(no trained detector weights published for this entry)")
        return "random weights (no trained weights published for this entry)"


def zoo_dir():
    """The folder holding the zoo's *.json files."""
    override = os.environ.get("KERASDET_ZOO_DIR")
    if override:
        if not os.path.isdir(override):
            raise FileNotFoundError(f"KERASDET_ZOO_DIR={override!r} is not a folder")
        return override
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for candidate in (os.path.join(package_root, "zoo"),
                      os.path.join(sys.prefix, "share", "kerasdet", "zoo")):
        if os.path.isdir(candidate) and any(f.endswith(".json") for f in os.listdir(candidate)):
            return candidate
    raise FileNotFoundError("kerasdet: the zoo config folder was not found (looked next to the "
                            "package and in <prefix>/share/kerasdet/zoo); set KERASDET_ZOO_DIR")


def _parse_file(path):
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"zoo file {path}: invalid JSON: {error}") from error
    family = document.get("family") or os.path.splitext(os.path.basename(path))[0]
    parsed = {}
    for name, spec in (document.get("entries") or {}).items():
        missing = [key for key in _REQUIRED if key not in spec]
        if missing:
            raise ValueError(f"zoo file {path}: entry {name!r} lacks {missing}")
        weights = spec.get("weights")
        if weights is not None and not (weights.get("url") and (
                weights.get("sha256") or (weights.get("converter") and weights.get("sha256_prefix")))):
            raise ValueError(f"zoo file {path}: entry {name!r}: weights need 'url' and 'sha256' (or, for a "
                             "published checkpoint with a 'converter', its 'sha256_prefix')")
        prefix = (weights or {}).get("sha256_prefix")
        if prefix and not weights.get("sha256") and f"-{prefix}" not in os.path.basename(weights["url"]):
            # torch.hub's convention: the prefix is part of the published name; a mismatch is a typo.
            raise ValueError(f"zoo file {path}: entry {name!r}: sha256_prefix {prefix!r} is not in the file name "
                             f"of {weights['url']}")
        published = spec.get("published_metrics")
        if published is not None and not published.get("source"):
            raise ValueError(f"zoo file {path}: entry {name!r}: published_metrics must name their 'source'")
        new_layers = spec.get("pretrained_backbone_new_layers")
        if new_layers is not None and not (spec.get("pretrained_backbone") and new_layers.get("layers")
                                           and new_layers.get("why")):
            raise ValueError(f"zoo file {path}: entry {name!r}: pretrained_backbone_new_layers needs a "
                             "'pretrained_backbone', a list of 'layers' and the 'why'")
        parsed[name] = ZooEntry(
            name=name, family=family, class_path=spec["class"], arguments=dict(spec["arguments"]),
            dataset=spec["dataset"], class_names=spec["class_names"], input=dict(spec["input"]),
            weights=weights, metrics=dict(spec.get("metrics") or {}), command=spec.get("command"),
            recipe=dict(spec.get("recipe") or {}), notes=spec.get("notes", ""), source_file=path,
            pretrained_backbone=spec.get("pretrained_backbone"), published_metrics=published,
            pretrained_backbone_new_layers=tuple((new_layers or {}).get("layers") or ()),
            pretrained_parts=tuple(spec.get("pretrained_parts") or ()))
    return parsed


_cache = {}


def entries(reload=False):
    """{name: ZooEntry} of every entry in the zoo folder (read once, cached)."""
    folder = zoo_dir()
    if reload or _cache.get("dir") != folder:
        table = {}
        for file_name in sorted(os.listdir(folder)):
            if not file_name.endswith(".json"):
                continue
            for name, entry in _parse_file(os.path.join(folder, file_name)).items():
                if name in table:
                    raise ValueError(f"zoo entry {name!r} is defined in both {table[name].source_file} "
                                     f"and {entry.source_file}")
                table[name] = entry
        _cache.update(dir=folder, table=table)
    return _cache["table"]


def get_entry(name):
    """The ZooEntry called ``name``; an unknown name raises UnknownModelError with suggestions."""
    table = entries()
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown zoo model {name!r}.{hint} kerasdet.zoo.list() shows all "
                                f"{len(table)} entries.")
    return table[name]
