"""The one resize / pad rule of kerasdet, and its inverse.

The training pipeline, evaluation, `predict`, `kerasdet predict` and the exported SavedModel all
resize through `ResizeRule`, and map boxes back with `boxes_to_original`, so an image is seen at the
same size on every path.

Modes (one of them):
    min_size=S, max_size=M   shorter side to S unless the longer side would pass M (Faster R-CNN).
                             ``min_size`` may be a tuple: in training a random choice per image
                             (multi-scale training); at test time ``min_size_test`` (default: the
                             largest of them).
    image_size=(H, W)        letterbox: fit inside H x W keeping the aspect ratio; with
                             ``keep_aspect_ratio=False`` stretch to exactly H x W (SSD, RefineDet).
The resized size is ``round(side * scale)`` (kerasdet's convention) or ``floor`` (torchvision's
GeneralizedRCNNTransform, ``size_rounding="floor"``), computed in float64 as torchvision does in
Python, then padded bottom / right up to a multiple of ``stride`` (a fixed ``image_size`` canvas is
also rounded up to it).

``image_info`` [6] = (original h, original w, scale y, scale x, resized h, resized w); a box in
network-input pixels maps back to the original image as x / scale_x, y / scale_y.

Padding: the pipeline, predict and export pad with zeros, and `kerasdet.models.base.Detector` fills
the padded area with its backbone's normalization mean before the backbone sees it (see
``Detector.fill_padding``): after normalization the padding is exactly 0, as in the torchvision and
Detectron2 checkpoints kerasdet converts, which pad the normalized image with zeros.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

__all__ = ["ResizeRule", "boxes_to_original", "round_up"]

_ROUNDINGS = ("round", "floor")


def round_up(value, stride):
    """``value`` rounded up to a multiple of ``stride`` (ints or int tensors)."""
    return ((value + stride - 1) // stride) * stride


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or int(value) != value \
            or int(value) < 1:
        raise ValueError(f"input settings: {name} must be a positive integer, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ResizeRule:
    """How a model's input images are resized and padded (see the module docstring)."""

    min_size: tuple | None = None
    max_size: int | None = None
    min_size_test: int | None = None
    image_size: tuple | None = None
    keep_aspect_ratio: bool = True
    stride: int = 1
    size_rounding: str = "round"

    def __post_init__(self):
        if (self.image_size is None) == (self.min_size is None):
            raise ValueError("input settings need exactly one resize mode: image_size=(H, W), or "
                             f"min_size (+ max_size); got min_size={self.min_size!r}, "
                             f"image_size={self.image_size!r}")
        if self.min_size is not None:
            sizes = self.min_size if isinstance(self.min_size, (tuple, list)) else (self.min_size,)
            if not sizes:
                raise ValueError("input settings: min_size must not be empty")
            object.__setattr__(self, "min_size", tuple(_positive_int(s, "min_size") for s in sizes))
        if self.image_size is not None:
            size = self.image_size
            if isinstance(size, (int, np.integer)):
                size = (size, size)
            if len(size) != 2:
                raise ValueError(f"input settings: image_size must be (H, W), got {self.image_size!r}")
            object.__setattr__(self, "image_size", tuple(_positive_int(s, "image_size") for s in size))
        for name in ("max_size", "min_size_test"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        object.__setattr__(self, "stride", _positive_int(self.stride, "stride"))
        object.__setattr__(self, "keep_aspect_ratio", bool(self.keep_aspect_ratio))
        if self.size_rounding not in _ROUNDINGS:
            raise ValueError(f"input settings: size_rounding must be one of {_ROUNDINGS}, "
                             f"got {self.size_rounding!r}")

    # ------------------------------------------------------------------ construction / config
    @classmethod
    def from_settings(cls, settings):
        """A rule from a settings dict (zoo entry "input", a model's ``input_settings``) or a rule."""
        if isinstance(settings, ResizeRule):
            return settings
        if not isinstance(settings, dict):
            raise TypeError(f"input settings must be a dict, got {type(settings).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"input settings: unknown keys {unknown} (known: {sorted(known)})")
        values = {k: v for k, v in settings.items() if v is not None}
        return cls(**values)

    def to_settings(self):
        """JSON-able dict that ``from_settings`` turns back into this rule (defaults left out)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or value == field.default:
                continue
            if field.name == "min_size" and len(value) == 1:
                value = value[0]
            out[field.name] = list(value) if isinstance(value, tuple) else value
        out["stride"] = self.stride
        return out

    def replace(self, **changes):
        """A copy with some settings changed (``None`` removes a setting)."""
        settings = self.to_settings()
        settings.update(changes)
        if changes.get("image_size") is not None:
            settings.pop("min_size", None)
            settings.pop("max_size", None)
            settings.pop("min_size_test", None)
        if changes.get("min_size") is not None:
            settings.pop("image_size", None)
        return ResizeRule.from_settings(settings)

    @property
    def test_min_size(self):
        """The shorter side used outside training."""
        if self.min_size is None:
            return None
        return self.min_size_test or max(self.min_size)

    # ------------------------------------------------------------------ the rule
    def target_size(self, height, width, training=False, seed=None):
        """(resized height, resized width) as float32 scalar tensors for an image of height x width.

        In training with several ``min_size`` values one is drawn per image with the stateless
        ``seed`` (required then).
        """
        h = tf.cast(height, tf.float64)
        w = tf.cast(width, tf.float64)
        if self.image_size is not None:
            th, tw = (float(v) for v in self.image_size)
            if not self.keep_aspect_ratio:
                return tf.constant(th, tf.float32), tf.constant(tw, tf.float32)
            scale = tf.minimum(th / h, tw / w)
            new_h, new_w = self._rounded(h * scale), self._rounded(w * scale)
            return (tf.cast(tf.clip_by_value(new_h, 1.0, th), tf.float32),
                    tf.cast(tf.clip_by_value(new_w, 1.0, tw), tf.float32))
        if training and len(self.min_size) > 1:
            if seed is None:
                raise ValueError("multi-scale training (several min_size values) needs a seed")
            pick = tf.random.stateless_uniform([], seed, 0, len(self.min_size), tf.int32)
            short = tf.gather(tf.constant(self.min_size, tf.float64), pick)
        else:
            short = tf.constant(float(max(self.min_size) if training else self.test_min_size), tf.float64)
        scale = short / tf.minimum(h, w)
        if self.max_size is not None:
            scale = tf.minimum(scale, float(self.max_size) / tf.maximum(h, w))
        new_h = tf.maximum(self._rounded(h * scale), 1.0)
        new_w = tf.maximum(self._rounded(w * scale), 1.0)
        return tf.cast(new_h, tf.float32), tf.cast(new_w, tf.float32)

    def _rounded(self, value):
        return tf.floor(value) if self.size_rounding == "floor" else tf.round(value)

    def canvas_size(self, new_h, new_w):
        """Padded (height, width) int32 tensors for one resized image."""
        if self.image_size is not None:
            return (tf.constant(round_up(self.image_size[0], self.stride), tf.int32),
                    tf.constant(round_up(self.image_size[1], self.stride), tf.int32))
        return (round_up(tf.cast(new_h, tf.int32), self.stride),
                round_up(tf.cast(new_w, tf.int32), self.stride))

    def max_canvas(self):
        """The (H, W) canvas every resized image fits in: a fixed-size export needs it."""
        if self.image_size is not None:
            return (round_up(self.image_size[0], self.stride), round_up(self.image_size[1], self.stride))
        if self.max_size is None:
            raise ValueError(f"input settings {self.to_settings()} have no max_size, so resized images "
                             "have no bound; give max_size or image_size")
        side = round_up(self.max_size, self.stride)
        return side, side

    def resize(self, image, training=False, seed=None):
        """float32 [h, w, 3] -> (resized float32 [new_h, new_w, 3], image_info float32 [6]).

        Bilinear with half-pixel centres (tf.image.resize; the same sampling as PyTorch's
        interpolate(mode="bilinear", align_corners=False)).
        """
        shape = tf.shape(image)
        h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
        new_h, new_w = self.target_size(h, w, training=training, seed=seed)
        size = tf.stack([tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)])
        resized = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
        return resized, image_info(h, w, new_h, new_w)

    def prepare(self, image):
        """One image for inference: (zero-padded canvas float32 [H, W, 3], image_info [6])."""
        resized, info = self.resize(image)
        canvas_h, canvas_w = self.canvas_size(info[4], info[5])
        return tf.image.pad_to_bounding_box(resized, 0, 0, canvas_h, canvas_w), info


def image_info(height, width, new_h, new_w):
    """The pipeline's image_info row for an image resized from height x width to new_h x new_w."""
    return tf.stack([height, width, new_h / height, new_w / width, new_h, new_w])


def boxes_to_original(boxes, info):
    """Boxes [..., 4] in network-input pixels -> pixels of the original image, clipped to it.

    ``info`` is one image_info row [6] (or rows broadcastable against ``boxes[..., :1]``). numpy in,
    numpy out (float64); tensors in, tensors out.
    """
    if isinstance(boxes, (tf.Tensor, tf.Variable)):
        info = tf.cast(info, boxes.dtype)
        scale = tf.stack([info[..., 3], info[..., 2], info[..., 3], info[..., 2]], axis=-1)
        limit = tf.stack([info[..., 1], info[..., 0], info[..., 1], info[..., 0]], axis=-1)
        if scale.shape.rank < boxes.shape.rank:
            scale, limit = scale[..., None, :], limit[..., None, :]
        return tf.clip_by_value(boxes / scale, 0.0, limit)
    boxes = np.asarray(boxes, np.float64)
    info = np.asarray(info, np.float64)
    if np.any(info[..., 2:4] <= 0):
        raise ValueError(f"image_info {info.tolist()} has a non-positive scale")
    scale = np.stack([info[..., 3], info[..., 2], info[..., 3], info[..., 2]], axis=-1)
    limit = np.stack([info[..., 1], info[..., 0], info[..., 1], info[..., 0]], axis=-1)
    if scale.ndim < boxes.ndim:
        scale, limit = scale[..., None, :], limit[..., None, :]
    return np.clip(boxes / scale, 0.0, limit)
