"""Keras layers for spatial pyramid pooling (kerasdet.ops.spp).

Both pool in the layer's compute dtype (float16 / bfloat16 under a mixed policy: max pooling only
selects values, so nothing is lost by it). The RoI layer's windows stay integer / float32: see
`keep_input_dtypes`.

Not a RoIExtractor pooler: RoIExtractor's poolers take image-pixel boxes with a `spatial_scale`
and return [B, R, S, S, C] grids, which its call reshapes and scatters per FPN level. SPP returns
a flat [B, R, C * sum(n^2)] vector from windows already projected by SPP-net's corner rule at the
scale chosen per window, so registering it there would need a second output layout and a second
box convention in RoIExtractor; the SPP-net detector calls RoISpatialPyramidPooling directly.
"""
import keras
import tensorflow as tf

from kerasdet.layers.roi_layers import keep_input_dtypes
from kerasdet.ops import spp

__all__ = ["SpatialPyramidPooling", "RoISpatialPyramidPooling"]


def _checked_levels(layer, levels):
    try:
        levels = tuple(int(n) for n in levels)
    except TypeError:
        raise TypeError(f"{layer}: `levels` must be a sequence of ints, got {levels!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"{layer}: `levels` must be non-empty positive ints, got {levels!r}")
    return levels


@keras.saving.register_keras_serializable(package="kerasdet")
class SpatialPyramidPooling(keras.layers.Layer):
    """[B, H, W, C] maps of any size -> [B, C * sum(n^2)] (``kerasdet.ops.spatial_pyramid_pool``).

    Args:
      levels: pyramid levels, n x n bins each (default (6, 3, 2, 1): 50 bins).
    """

    def __init__(self, levels=spp.SPP_LEVELS, **kwargs):
        super().__init__(**kwargs)
        self.levels = _checked_levels(type(self).__name__, levels)

    def call(self, features):
        return spp.spatial_pyramid_pool(tf.cast(features, self.compute_dtype), self.levels)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        dim = None if channels is None else spp.spp_output_dim(channels, self.levels)
        return (input_shape[0], dim)

    def get_config(self):
        config = super().get_config()
        config.update(levels=list(self.levels))
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class RoISpatialPyramidPooling(keras.layers.Layer):
    """SPP of RoI windows (``kerasdet.ops.roi_spatial_pyramid_pool``).

    Called as ``layer(features, rois)`` with padded [B, N, 4] windows (output [B, N, D]) or
    ``layer(features, rois, box_indices)`` with [R, 4] windows (output [R, D]); the windows are
    inclusive feature-map cells from ``kerasdet.ops.spp.project_to_features``.
    """

    def __init__(self, levels=spp.SPP_LEVELS, **kwargs):
        super().__init__(**kwargs)
        keep_input_dtypes(self)
        self.levels = _checked_levels(type(self).__name__, levels)

    def call(self, features, rois, box_indices=None):
        features = tf.cast(features, self.compute_dtype)
        rois = tf.convert_to_tensor(rois)
        if rois.dtype.is_floating:
            rois = tf.cast(rois, tf.float32)
        return spp.roi_spatial_pyramid_pool(features, rois, box_indices, self.levels)

    def compute_output_shape(self, features_shape, rois_shape, box_indices_shape=None):
        channels = features_shape[-1]
        dim = None if channels is None else spp.spp_output_dim(channels, self.levels)
        if box_indices_shape is None:
            return (rois_shape[0], rois_shape[1], dim)
        return (rois_shape[0], dim)

    def get_config(self):
        config = super().get_config()
        config.update(levels=list(self.levels))
        return config
