"""RoI feature extraction: one pooler per feature level, RoIs routed to the levels by their size.

The pooler is a choice (the RoI pooling layers of kerasdet.layers): "roi_pool" (Fast R-CNN),
"roi_align" (Mask R-CNN), "deform_roi_pool" (Deformable ConvNets; learned offsets, so each level
has its own), and the position-sensitive "ps_roi_pool", "ps_roi_align", "deform_ps_roi_pool"
(R-FCN's score maps). The routing is FPN's eq. (1), the same for every pooler.
"""
import math

import keras
import tensorflow as tf

from kerasdet.layers.roi_layers import (DeformPSRoIPool, DeformRoIPool, PSRoIAlign, PSRoIPool,
                                        RoIAlign, RoIPool, keep_input_dtypes)
from kerasdet.ops.xla import in_xla_context

__all__ = ["fpn_level_of_rois", "POOLERS", "RoIExtractor"]

# method -> (layer class, the constructor arguments it takes besides output size and scale)
POOLERS = {
    "roi_pool": (RoIPool, ()),
    "roi_align": (RoIAlign, ("sampling_ratio", "aligned")),
    "deform_roi_pool": (DeformRoIPool, ("sampling_ratio", "aligned", "gamma")),
    "ps_roi_pool": (PSRoIPool, ()),
    "ps_roi_align": (PSRoIAlign, ("sampling_ratio",)),
    "deform_ps_roi_pool": (DeformPSRoIPool, ("sampling_ratio", "gamma")),
}


def fpn_level_of_rois(boxes, min_level=2, max_level=5, canonical_size=224.0, canonical_level=4):
    """FPN paper eq. (1): k = floor(k0 + log2(sqrt(w * h) / 224)), clamped to [min_level, max_level].

    A 1e-6 is added before the floor, as torchvision does, so that a box of exactly 224 * 2^j pixels
    lands on level k0 + j despite log2 rounding below the integer.
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    size = tf.sqrt(tf.maximum(w * h, 1e-6))
    level = tf.floor(canonical_level + tf.math.log(size / canonical_size) / math.log(2.0) + 1e-6)
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


@keras.saving.register_keras_serializable(package="kerasdet")
class RoIExtractor(keras.layers.Layer):
    """Pools [B, R, 4] RoIs from features into [B, R, S, S, C'].

    With one feature map the RoIs are pooled from it; with a pyramid (a list of maps for levels
    `min_level`..) each RoI is pooled from the level its size picks (FPN eq. 1). C' is the maps'
    channels, divided by S * S for the position-sensitive poolers. ``aligned`` (RoIAlign and the
    deformable RoI pooling) shifts by half a pixel as Detectron2 does; torchvision's detectors use
    False. ``gamma`` is the deformable poolers' offset scale (0.1 in the paper).
    """

    def __init__(self, output_size=7, strides=(16,), method="roi_align", sampling_ratio=0,
                 min_level=2, canonical_size=224.0, canonical_level=4, aligned=True, gamma=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        keep_input_dtypes(self)  # the RoIs stay float32 under a mixed policy
        if method not in POOLERS:
            raise ValueError(f"`method` must be one of {sorted(POOLERS)}, got {method!r}.")
        self.output_size = int(output_size)
        self.strides = tuple(int(s) for s in strides)
        self.method = method
        self.sampling_ratio = int(sampling_ratio)
        self.min_level = int(min_level)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.aligned = bool(aligned)
        self.gamma = float(gamma)
        layer, options = POOLERS[method]
        settings = {"sampling_ratio": self.sampling_ratio, "aligned": self.aligned,
                    "gamma": self.gamma}
        self.pools = [layer(self.output_size, 1.0 / s, dtype=self.dtype_policy,
                            name=f"{method}_{i}", **{k: settings[k] for k in options})
                      for i, s in enumerate(self.strides)]

    def _checked(self, features):
        features = list(features) if isinstance(features, (list, tuple)) else [features]
        if len(features) != len(self.strides):
            raise ValueError(f"RoIExtractor got {len(features)} feature maps for strides "
                             f"{self.strides}.")
        return features

    def build(self, features_shape, rois_shape=None):
        nested = isinstance(features_shape, (list, tuple)) and \
            isinstance(features_shape[0], (list, tuple))
        for pool, shape in zip(self.pools, self._checked(features_shape if nested
                                                         else [features_shape])):
            pool.build(tuple(shape))

    def call(self, features, rois):
        features = [tf.cast(f, self.compute_dtype) for f in self._checked(features)]
        batch, num = tf.shape(rois)[0], tf.shape(rois)[1]
        boxes = tf.reshape(tf.cast(rois, tf.float32), [-1, 4])
        box_indices = tf.repeat(tf.range(batch, dtype=tf.int32), num)
        size = self.output_size
        channels = features[0].shape[-1]
        if POOLERS[self.method][0].position_sensitive:
            channels //= size * size
        if len(features) == 1:
            pooled = self.pools[0](features[0], boxes, box_indices)
        else:
            levels = fpn_level_of_rois(boxes, self.min_level, self.min_level + len(features) - 1,
                                       self.canonical_size, self.canonical_level)
            if in_xla_context():
                # Each level's RoI count is data-dependent, which XLA cannot compile: every level
                # pools every RoI and each RoI keeps its own level's result (same numbers, L times
                # the pooling work).
                pooled = None
                for i, (feature, pool) in enumerate(zip(features, self.pools)):
                    level_pooled = pool(feature, boxes, box_indices)
                    pooled = level_pooled if pooled is None else tf.where(
                        (levels == self.min_level + i)[:, None, None, None], level_pooled, pooled)
                return tf.reshape(pooled, [batch, num, size, size, channels])
            pooled = tf.zeros([tf.shape(boxes)[0], size, size, channels], features[0].dtype)
            for i, (feature, pool) in enumerate(zip(features, self.pools)):
                where = tf.where(levels == self.min_level + i)  # [K, 1]
                level_pooled = pool(feature, tf.gather_nd(boxes, where),
                                    tf.gather_nd(box_indices, where))
                pooled = tf.tensor_scatter_nd_update(pooled, where, level_pooled)
        return tf.reshape(pooled, [batch, num, size, size, channels])

    def get_config(self):
        config = super().get_config()
        config.update(output_size=self.output_size, strides=self.strides, method=self.method,
                      sampling_ratio=self.sampling_ratio, min_level=self.min_level,
                      canonical_size=self.canonical_size, canonical_level=self.canonical_level,
                      aligned=self.aligned, gamma=self.gamma)
        return config
