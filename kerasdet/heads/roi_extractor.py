"""RoI feature extraction from one feature map or a pyramid, through the kerasdet.ops kernels."""
import math

import keras
import tensorflow as tf

from kerasdet import ops

__all__ = ["fpn_level_of_rois", "RoIExtractor"]

_POOLERS = {
    "roi_align": lambda f, b, i, size, scale, sr, aligned: ops.roi_align(
        f, b, i, size, spatial_scale=scale, sampling_ratio=sr, aligned=aligned),
    "roi_pool": lambda f, b, i, size, scale, sr, aligned: ops.roi_pool(f, b, i, size, spatial_scale=scale),
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
    """Pools [B, R, 4] RoIs from features into [B, R, S, S, C].

    With one feature map the RoIs are pooled from it; with a pyramid (a list of maps for levels
    `min_level`..) each RoI is pooled from the level its size picks (FPN eq. 1). ``aligned``
    (RoIAlign only) shifts by half a pixel as Detectron2 does; torchvision's detectors use False.
    """

    def __init__(self, output_size=7, strides=(16,), method="roi_align", sampling_ratio=0,
                 min_level=2, canonical_size=224.0, canonical_level=4, aligned=True, **kwargs):
        super().__init__(**kwargs)
        if method not in _POOLERS:
            raise ValueError(f"`method` must be one of {sorted(_POOLERS)}, got {method!r}.")
        self.output_size = int(output_size)
        self.strides = tuple(int(s) for s in strides)
        self.method = method
        self.sampling_ratio = int(sampling_ratio)
        self.min_level = int(min_level)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.aligned = bool(aligned)

    def _pool(self, feature, boxes, box_indices, stride):
        return _POOLERS[self.method](feature, boxes, box_indices,
                                     (self.output_size, self.output_size), 1.0 / stride,
                                     self.sampling_ratio, self.aligned)

    def call(self, features, rois):
        if not isinstance(features, (list, tuple)):
            features = [features]
        if len(features) != len(self.strides):
            raise ValueError(f"RoIExtractor got {len(features)} feature maps for strides "
                             f"{self.strides}.")
        batch = tf.shape(rois)[0]
        num = tf.shape(rois)[1]
        boxes = tf.reshape(rois, [-1, 4])
        box_indices = tf.repeat(tf.range(batch, dtype=tf.int32), num)
        channels = features[0].shape[-1]
        if len(features) == 1:
            pooled = self._pool(features[0], boxes, box_indices, self.strides[0])
        else:
            max_level = self.min_level + len(features) - 1
            levels = fpn_level_of_rois(boxes, self.min_level, max_level, self.canonical_size,
                                       self.canonical_level)
            pooled = tf.zeros([tf.shape(boxes)[0], self.output_size, self.output_size, channels],
                              features[0].dtype)
            for i, (feature, stride) in enumerate(zip(features, self.strides)):
                where = tf.where(levels == self.min_level + i)  # [K, 1]
                level_pooled = self._pool(feature, tf.gather_nd(boxes, where),
                                          tf.gather_nd(box_indices, where), stride)
                pooled = tf.tensor_scatter_nd_update(pooled, where, level_pooled)
        return tf.reshape(pooled, [batch, num, self.output_size, self.output_size, channels])

    def get_config(self):
        config = super().get_config()
        config.update(output_size=self.output_size, strides=self.strides, method=self.method,
                      sampling_ratio=self.sampling_ratio, min_level=self.min_level,
                      canonical_size=self.canonical_size, canonical_level=self.canonical_level,
                      aligned=self.aligned)
        return config
