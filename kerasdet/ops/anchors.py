"""Anchor (reference box) generation for RPNs and single-shot heads.

Geometry: an anchor of size ``s`` and aspect ratio ``r = h / w`` has area ``s**2``:
``w = s / sqrt(r)``, ``h = s * sqrt(r)``. The anchors of feature-map cell (row y, column x) of a
level with stride ``t`` are centered at ``((x + 0.5) * t, (y + 0.5) * t)`` in input-image pixels,
with continuous coordinates (no +1, no rounding of sizes, unlike the original Caffe code).

Order of the flattened anchors [H * W * A, 4]: location-major (row y, then column x), then anchor
type, so they line up with a conv head output [H, W, A * k] reshaped to [H * W * A, k]. Within a
location the anchor types are aspect-ratio-major, size-minor (type = ratio_index * len(sizes) +
size_index), the order of the original Faster R-CNN code and of torchvision, so their RPN weights
map without a channel permutation.
"""
import math

import tensorflow as tf

__all__ = [
    "cell_anchors",
    "generate_anchors",
    "AnchorGenerator",
    "anchors_inside_image_mask",
]


def _positive_floats(values, name):
    try:
        values = tuple(float(v) for v in values)
    except TypeError:
        values = (float(values),)
    if not values or min(values) <= 0 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"`{name}` must be a non-empty list of positive numbers, got {values}.")
    return values


def cell_anchors(sizes, aspect_ratios, rounded=False):
    """The A = len(aspect_ratios) * len(sizes) anchors of one location, centered at (0, 0).

    ``rounded`` rounds the corners to whole pixels (half to even), as the original Caffe code and
    torchvision do; their checkpoints were trained with those anchors.

    Returns:
        float32 [A, 4] (x1, y1, x2, y2), aspect-ratio-major then size (see module docstring).
    """
    sizes = _positive_floats(sizes, "sizes")
    aspect_ratios = _positive_floats(aspect_ratios, "aspect_ratios")
    rows = []
    for ratio in aspect_ratios:
        for size in sizes:
            half_w = size / math.sqrt(ratio) / 2.0
            half_h = size * math.sqrt(ratio) / 2.0
            rows.append((-half_w, -half_h, half_w, half_h))
    cell = tf.constant(rows, tf.float32)
    return tf.round(cell) if rounded else cell


def generate_anchors(feature_size, stride, sizes, aspect_ratios, offset=0.5, rounded=False):
    """Anchors of one pyramid level.

    Args:
        feature_size: (H, W) of the feature map: Python ints or int32 scalars/tensor [2] (dynamic
            shapes are fine, e.g. ``tf.shape(features)[1:3]``).
        stride: the level's stride in input pixels.
        sizes: anchor sizes (sqrt of the area) in input pixels.
        aspect_ratios: h / w ratios.
        offset: cell centres at (x + offset) * stride; torchvision's detectors use 0 (anchors on
            the cells' top-left corners), and their checkpoints need it.
        rounded: round the cell anchors to whole pixels (see `cell_anchors`).

    Returns:
        float32 [H * W * A, 4], A = len(sizes) * len(aspect_ratios), ordered as described in the
        module docstring; centers at ((x + offset) * stride, (y + offset) * stride).
    """
    stride = _positive_floats([stride], "stride")[0]
    cell = cell_anchors(sizes, aspect_ratios, rounded)
    feature_size = tf.cast(feature_size, tf.int32)
    height, width = feature_size[0], feature_size[1]
    centers_x = (tf.range(width, dtype=tf.float32) + offset) * stride
    centers_y = (tf.range(height, dtype=tf.float32) + offset) * stride
    grid_y, grid_x = tf.meshgrid(centers_y, centers_x, indexing="ij")  # [H, W]
    centers = tf.stack([grid_x, grid_y, grid_x, grid_y], axis=-1)  # [H, W, 4]
    anchors = centers[:, :, tf.newaxis, :] + cell[tf.newaxis, tf.newaxis, :, :]  # [H, W, A, 4]
    return tf.reshape(anchors, [-1, 4])


class AnchorGenerator:
    """Anchors for a list of pyramid levels; a plain configurable object (``get_config`` /
    ``from_config``) that models keep as an attribute.

    Args:
        strides: one stride per level.
        sizes: one tuple of sizes per level.
        aspect_ratios: one tuple of h / w ratios shared by all levels, or one tuple per level.
        offset / rounded: anchor-centre offset in cells and whole-pixel rounding (see
            `generate_anchors`); (0.5, False) by default, (0.0, True) for torchvision checkpoints.
    """

    def __init__(self, strides, sizes, aspect_ratios=(0.5, 1.0, 2.0), offset=0.5, rounded=False):
        self.offset = float(offset)
        self.rounded = bool(rounded)
        self.strides = _positive_floats(strides, "strides")
        num_levels = len(self.strides)
        sizes = list(sizes)
        if len(sizes) != num_levels:
            raise ValueError(
                f"`sizes` needs one entry per level ({num_levels} strides), got {len(sizes)}."
            )
        self.sizes = [_positive_floats(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
        ratios = list(aspect_ratios)
        if ratios and isinstance(ratios[0], (list, tuple)):
            if len(ratios) != num_levels:
                raise ValueError(
                    f"Per-level `aspect_ratios` needs {num_levels} entries, got {len(ratios)}."
                )
            self.aspect_ratios = [_positive_floats(r, f"aspect_ratios[{i}]")
                                  for i, r in enumerate(ratios)]
        else:
            self.aspect_ratios = [_positive_floats(ratios, "aspect_ratios")] * num_levels

    @property
    def num_levels(self):
        return len(self.strides)

    @property
    def num_anchors_per_location(self):
        """A per level (the head's conv must output A * k channels)."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def __call__(self, feature_sizes):
        """List of [H_l * W_l * A_l, 4] anchors, one per level, for feature sizes [(H_l, W_l)]."""
        feature_sizes = list(feature_sizes)
        if len(feature_sizes) != self.num_levels:
            raise ValueError(
                f"`feature_sizes` needs {self.num_levels} (H, W) entries, got {len(feature_sizes)}."
            )
        return [generate_anchors(fs, st, sz, ar, self.offset, self.rounded) for fs, st, sz, ar in
                zip(feature_sizes, self.strides, self.sizes, self.aspect_ratios)]

    def feature_sizes_for_image(self, image_size):
        """(ceil(H / stride), ceil(W / stride)) per level: the feature sizes of a backbone with
        'same' padding. Prefer the real feature-map shapes when you have them."""
        image_size = tf.cast(image_size, tf.float32)
        return [tf.cast(tf.math.ceil(image_size / s), tf.int32) for s in self.strides]

    def for_image(self, image_size):
        """All levels' anchors concatenated, [sum_l H_l * W_l * A_l, 4], for an (H, W) input."""
        return tf.concat(self(self.feature_sizes_for_image(image_size)), axis=0)

    def get_config(self):
        return {"strides": list(self.strides), "sizes": [list(s) for s in self.sizes],
                "aspect_ratios": [list(r) for r in self.aspect_ratios], "offset": self.offset,
                "rounded": self.rounded}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def faster_rcnn(cls):
        """Faster R-CNN: one level, stride 16, sizes 128/256/512 x ratios 0.5/1/2 (A = 9)."""
        return cls(strides=(16,), sizes=[(128, 256, 512)], aspect_ratios=(0.5, 1.0, 2.0))

    @classmethod
    def fpn(cls):
        """FPN: P2..P6, strides 4..64, one size 32..512 per level, ratios 1:2, 1:1, 2:1 (A = 3)."""
        return cls(strides=(4, 8, 16, 32, 64), sizes=[(32,), (64,), (128,), (256,), (512,)],
                   aspect_ratios=(0.5, 1.0, 2.0))

    @classmethod
    def refinedet(cls):
        """RefineDet: strides 8/16/32/64, size 4 x stride, ratios 0.5/1/2 (A = 3)."""
        strides = (8, 16, 32, 64)
        return cls(strides=strides, sizes=[(4 * s,) for s in strides],
                   aspect_ratios=(0.5, 1.0, 2.0))


def anchors_inside_image_mask(anchors, image_shape, allowed_border=0.0):
    """Boolean mask of anchors lying inside the image up to `allowed_border` pixels.

    Faster R-CNN ignores cross-boundary anchors while training the RPN (allowed_border=0).

    Args:
        anchors: [N, 4].
        image_shape: (height, width), or per-image [B, 2] for a padded batch -> mask [B, N].
    """
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    shape = tf.cast(tf.convert_to_tensor(image_shape), tf.float32)
    if shape.shape.rank not in (1, 2) or shape.shape[-1] not in (None, 2):
        raise ValueError(f"`image_shape` must be (height, width) or [B, 2], got {shape.shape}.")
    height, width = shape[..., 0:1], shape[..., 1:2]  # [1] or [B, 1]
    border = tf.cast(allowed_border, tf.float32)
    return ((anchors[:, 0] >= -border) & (anchors[:, 1] >= -border)
            & (anchors[:, 2] <= width + border) & (anchors[:, 3] <= height + border))
