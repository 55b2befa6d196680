"""Keras layers wrapping the RoI pooling ops of kerasdet.ops.roi.

Every layer is called as ``layer(features, boxes, box_indices)`` with flat boxes [R, 4] and their
batch indices [R] (output [R, ph, pw, C_out]), or as ``layer(features, boxes)`` with padded
per-image boxes [B, N, 4] (output [B, N, ph, pw, C_out]). Boxes are (x1, y1, x2, y2) in pixels of
the network input; ``spatial_scale`` maps them to the feature map (1 / stride).

Under a mixed-precision policy the features are pooled in the compute dtype (float16 / bfloat16,
see kerasdet.ops.roi) but the boxes stay float32: see `keep_input_dtypes`.
"""
import keras
import tensorflow as tf

from kerasdet.ops import roi
from kerasdet.ops.xla import kernel_layer_supports_jit

__all__ = ["RoIPool", "RoIAlign", "PSRoIPool", "PSRoIAlign", "DeformRoIPool", "DeformPSRoIPool",
           "keep_input_dtypes"]


def keep_input_dtypes(layer):
    """Stops Keras from casting `layer`'s floating call arguments to its compute dtype (boxes stay
    float32 under a mixed policy); returns `layer`.

    Under a mixed policy Keras casts every floating argument of a layer call to the compute dtype,
    boxes included. bfloat16 keeps 8 significant bits, so a box corner at x = 300 moves by up to
    1 pixel and one at x = 1000 by up to 2 (float16: 0.125 and 0.25; tests/test_precision.py
    measures it on a pooled ramp). Layers that take boxes call this in their constructor and cast
    their feature inputs to ``layer.compute_dtype`` themselves. Their sublayers (convs, fc) keep
    their own autocasting, so their float32 variables are still read in the compute dtype.
    """
    layer.autocast = False
    return layer


class _RoIPoolingLayer(keras.layers.Layer):
    """Shared plumbing: argument checks, flat / batched boxes, output shapes and config."""

    position_sensitive = False
    supports_jit = kernel_layer_supports_jit(lambda layer: getattr(layer, "sampling_ratio", 1) > 0)

    def __init__(self, output_size, spatial_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        keep_input_dtypes(self)
        self.output_size = roi._output_size(type(self).__name__, output_size)
        self.spatial_scale = float(spatial_scale)
        if not self.spatial_scale > 0:
            raise ValueError(f"{type(self).__name__}: `spatial_scale` must be > 0, "
                             f"got {spatial_scale!r}")

    def _out_channels(self, channels):
        if channels is None:
            return None
        ph, pw = self.output_size
        if self.position_sensitive:
            if channels % (ph * pw):
                raise ValueError(f"{type(self).__name__}: the features have {channels} channels, "
                                 f"which is not divisible by output height * width = {ph * pw}")
            return channels // (ph * pw)
        return channels

    def _pool(self, features, boxes, box_indices):
        raise NotImplementedError

    def call(self, features, boxes, box_indices=None):
        features = tf.cast(features, self.compute_dtype)
        boxes = tf.cast(boxes, tf.float32)
        if box_indices is not None:
            return self._pool(features, boxes, box_indices)
        if boxes.shape.rank != 3:
            raise ValueError(f"{type(self).__name__}: without `box_indices`, `boxes` must be "
                             f"[B, N, 4], got shape {boxes.shape}")
        shape = tf.shape(boxes)
        batch, per_image = shape[0], shape[1]
        flat_boxes = tf.reshape(boxes, [-1, 4])
        indices = tf.repeat(tf.range(batch, dtype=tf.int32), per_image)
        pooled = self._pool(features, flat_boxes, indices)
        ph, pw = self.output_size
        return tf.reshape(pooled, [batch, per_image, ph, pw, tf.shape(pooled)[-1]])

    def compute_output_shape(self, features_shape, boxes_shape, box_indices_shape=None):
        ph, pw = self.output_size
        channels = self._out_channels(features_shape[-1])
        if box_indices_shape is None:
            return (boxes_shape[0], boxes_shape[1], ph, pw, channels)
        return (boxes_shape[0], ph, pw, channels)

    def get_config(self):
        config = super().get_config()
        config.update(output_size=list(self.output_size), spatial_scale=self.spatial_scale)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class RoIPool(_RoIPoolingLayer):
    """Fast R-CNN RoI max pooling (``kerasdet.ops.roi_pool``)."""

    supports_jit = kernel_layer_supports_jit(lambda layer: False)  # data-dependent window size

    def _pool(self, features, boxes, box_indices):
        return roi.roi_pool(features, boxes, box_indices, self.output_size, self.spatial_scale)


@keras.saving.register_keras_serializable(package="kerasdet")
class PSRoIPool(_RoIPoolingLayer):
    """R-FCN position-sensitive RoI pooling with average voting (``kerasdet.ops.ps_roi_pool``).

    ``bin_rule``: "rfcn" (R-FCN's reference pixel bins, the default) or "torchvision"
    (torchvision.ops.ps_roi_pool's, for weights trained with it).
    """

    position_sensitive = True

    def __init__(self, output_size, spatial_scale=1.0, bin_rule="rfcn", **kwargs):
        super().__init__(output_size, spatial_scale, **kwargs)
        self.bin_rule = roi.check_ps_bin_rule(type(self).__name__, bin_rule)

    def _pool(self, features, boxes, box_indices):
        return roi.ps_roi_pool(features, boxes, box_indices, self.output_size, self.spatial_scale,
                               bin_rule=self.bin_rule)

    def get_config(self):
        config = super().get_config()
        config.update(bin_rule=self.bin_rule)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class RoIAlign(_RoIPoolingLayer):
    """Mask R-CNN RoIAlign (``kerasdet.ops.roi_align``)."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True, **kwargs):
        super().__init__(output_size, spatial_scale, **kwargs)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def _pool(self, features, boxes, box_indices):
        return roi.roi_align(features, boxes, box_indices, self.output_size, self.spatial_scale,
                             self.sampling_ratio, self.aligned)

    def get_config(self):
        config = super().get_config()
        config.update(sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class PSRoIAlign(_RoIPoolingLayer):
    """Position-sensitive RoIAlign (``kerasdet.ops.ps_roi_align``)."""

    position_sensitive = True

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, **kwargs):
        super().__init__(output_size, spatial_scale, **kwargs)
        self.sampling_ratio = int(sampling_ratio)

    def _pool(self, features, boxes, box_indices):
        return roi.ps_roi_align(features, boxes, box_indices, self.output_size,
                                self.spatial_scale, self.sampling_ratio)

    def get_config(self):
        config = super().get_config()
        config.update(sampling_ratio=self.sampling_ratio)
        return config


class _DeformablePooling(_RoIPoolingLayer):
    """Deformable ConvNets' RoI pooling: a first regular pooling, a zero-initialized fc layer that
    predicts the normalized offsets of every bin from it, then the deformable pooling with those
    offsets (scaled by ``gamma``). At initialization the layer equals its regular pooling."""

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                 offset_groups=1, **kwargs):
        super().__init__(output_size, spatial_scale, **kwargs)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.offset_groups = int(offset_groups)
        if self.offset_groups < 1:
            raise ValueError(f"{type(self).__name__}: `offset_groups` must be >= 1, "
                             f"got {offset_groups}")
        ph, pw = self.output_size
        self.offset_fc = keras.layers.Dense(
            ph * pw * 2 * self.offset_groups, kernel_initializer="zeros",
            bias_initializer="zeros", dtype=self.dtype_policy, name="offset_fc")

    def build(self, features_shape, boxes_shape=None, box_indices_shape=None):
        channels = self._out_channels(features_shape[-1])
        if channels is None:
            raise ValueError(f"{type(self).__name__}: the channel dimension of the features "
                             "must be known")
        if channels % self.offset_groups:
            raise ValueError(f"{type(self).__name__}: `offset_groups` ({self.offset_groups}) must "
                             f"divide the {channels} output channels")
        ph, pw = self.output_size
        self.offset_fc.build((None, ph * pw * channels))

    def _regular(self, features, boxes, box_indices):
        raise NotImplementedError

    def _deformable(self, features, boxes, box_indices, offsets):
        raise NotImplementedError

    def _pool(self, features, boxes, box_indices):
        ph, pw = self.output_size
        first = self._regular(features, boxes, box_indices)
        flat = tf.reshape(first, [tf.shape(first)[0], -1])
        offsets = tf.reshape(self.offset_fc(flat), [-1, ph, pw, 2 * self.offset_groups])
        return self._deformable(features, boxes, box_indices, offsets)

    def get_config(self):
        config = super().get_config()
        config.update(sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                      offset_groups=self.offset_groups)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class DeformRoIPool(_DeformablePooling):
    """Deformable RoI pooling (``kerasdet.ops.deform_roi_pool``) with learned offsets.

    Args:
      output_size, spatial_scale, sampling_ratio, aligned: as in RoIAlign.
      gamma: offset scale (0.1 in the paper).
      offset_groups: channel groups with their own offsets (1 in the paper).
    """

    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, aligned=True, gamma=0.1,
                 offset_groups=1, **kwargs):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma, offset_groups,
                         **kwargs)
        self.aligned = bool(aligned)

    def _regular(self, features, boxes, box_indices):
        return roi.roi_align(features, boxes, box_indices, self.output_size, self.spatial_scale,
                             self.sampling_ratio, self.aligned)

    def _deformable(self, features, boxes, box_indices, offsets):
        return roi.deform_roi_pool(features, boxes, box_indices, offsets, self.output_size,
                                   self.spatial_scale, self.sampling_ratio, self.aligned,
                                   self.gamma)

    def get_config(self):
        config = super().get_config()
        config.update(aligned=self.aligned)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class DeformPSRoIPool(_DeformablePooling):
    """Deformable position-sensitive RoI pooling (``kerasdet.ops.deform_ps_roi_pool``).

    The offsets come from a first position-sensitive pooling of the same score maps through a
    zero-initialized fc layer (``offset_groups`` = 1 shares them across classes; the number of
    classes gives per-class offsets as in the paper's R-FCN head).
    """

    position_sensitive = True

    def _regular(self, features, boxes, box_indices):
        return roi.ps_roi_align(features, boxes, box_indices, self.output_size,
                                self.spatial_scale, self.sampling_ratio)

    def _deformable(self, features, boxes, box_indices, offsets):
        return roi.deform_ps_roi_pool(features, boxes, box_indices, offsets, self.output_size,
                                      self.spatial_scale, self.sampling_ratio, self.gamma)
