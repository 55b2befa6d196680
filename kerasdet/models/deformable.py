"""Deformable ConvNets detectors (Dai et al. 2017; Zhu et al. 2019 for the modulated v2).

  * `DeformableFasterRCNN`: Faster R-CNN (FPN or C4) whose RoI features come from deformable RoI
    pooling (`kerasdet.layers.DeformRoIPool`: a RoIAlign pooling, a zero-initialized fc that
    predicts normalized bin offsets, then the pooling again at the shifted bins, offsets scaled by
    gamma = 0.1). With FPN each level has its own pooling layer (and offset fc).
  * `deformable_rfcn(...)`: R-FCN with deformable PS-RoI pooling and deformable convs in the dilated
    res5 — the DCN paper's R-FCN — as an `RFCN` configuration.
  * Deformable convolution backbones: "resnet50_dcn", "resnet101_dcn", "resnet*_dilated" with
    `deformable_stages`, and "tiny_dcn" for tests (kerasdet.backbones.resnet_dcn).

Every deformable part starts with zero offsets, so at initialization a deformable detector computes
exactly what its plain twin (roi_align / ps_roi_align, plain convs) computes with the same weights.
"""
import keras
import tensorflow as tf

from kerasdet.backbones import resnet_dcn  # noqa: F401  (registers the DCN backbones)
from kerasdet.heads.roi_extractor import fpn_level_of_rois
from kerasdet.layers.roi_layers import DeformRoIPool
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.rfcn import RFCN

__all__ = ["DeformRoIExtractor", "DeformableFasterRCNN", "deformable_rfcn"]


@keras.saving.register_keras_serializable(package="kerasdet")
class DeformRoIExtractor(keras.layers.Layer):
    """Deformable RoI pooling of [B, R, 4] RoIs from one map or an FPN pyramid -> [B, R, S, S, C].

    The interface and FPN level assignment (FPN eq. 1) of `kerasdet.heads.RoIExtractor`; each
    level has its own `DeformRoIPool` (own offset fc), as the levels' features differ.
    """

    def __init__(self, output_size=7, strides=(16,), sampling_ratio=0, gamma=0.1, min_level=2,
                 canonical_size=224.0, canonical_level=4, **kwargs):
        super().__init__(**kwargs)
        self.output_size = int(output_size)
        self.strides = tuple(int(s) for s in strides)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.min_level = int(min_level)
        self.canonical_size = float(canonical_size)
        self.canonical_level = int(canonical_level)
        self.pools = [DeformRoIPool(self.output_size, 1.0 / s, self.sampling_ratio, aligned=True,
                                    gamma=self.gamma, dtype=self.dtype_policy,
                                    name=f"deform_pool_{i}")
                      for i, s in enumerate(self.strides)]

    def build(self, features_shape, rois_shape=None):
        shapes = features_shape if isinstance(features_shape, (list, tuple)) and \
            isinstance(features_shape[0], (list, tuple)) else [features_shape]
        if len(shapes) != len(self.pools):
            raise ValueError(f"DeformRoIExtractor got {len(shapes)} feature maps for strides "
                             f"{self.strides}.")
        for pool, shape in zip(self.pools, shapes):
            pool.build(tuple(shape))

    def call(self, features, rois):
        if not isinstance(features, (list, tuple)):
            features = [features]
        if len(features) != len(self.pools):
            raise ValueError(f"DeformRoIExtractor got {len(features)} feature maps for strides "
                             f"{self.strides}.")
        batch, num = tf.shape(rois)[0], tf.shape(rois)[1]
        boxes = tf.reshape(tf.cast(rois, tf.float32), [-1, 4])
        box_indices = tf.repeat(tf.range(batch, dtype=tf.int32), num)
        channels = features[0].shape[-1]
        size = self.output_size
        if len(features) == 1:
            pooled = self.pools[0](features[0], boxes, box_indices)
        else:
            levels = fpn_level_of_rois(boxes, self.min_level, self.min_level + len(features) - 1,
                                       self.canonical_size, self.canonical_level)
            pooled = tf.zeros([tf.shape(boxes)[0], size, size, channels], features[0].dtype)
            for i, (feature, pool) in enumerate(zip(features, self.pools)):
                where = tf.where(levels == self.min_level + i)
                level_pooled = pool(feature, tf.gather_nd(boxes, where),
                                    tf.gather_nd(box_indices, where))
                pooled = tf.tensor_scatter_nd_update(pooled, where, level_pooled)
        return tf.reshape(pooled, [batch, num, size, size, channels])

    def get_config(self):
        config = super().get_config()
        config.update(output_size=self.output_size, strides=list(self.strides),
                      sampling_ratio=self.sampling_ratio, gamma=self.gamma,
                      min_level=self.min_level, canonical_size=self.canonical_size,
                      canonical_level=self.canonical_level)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class DeformableFasterRCNN(FasterRCNN):
    """Faster R-CNN with deformable RoI pooling (and any backbone, e.g. "resnet50_dcn").

    Args:
        roi_pooling: "deform_roi_pool" (default) or any pooling `FasterRCNN` accepts (then this is
            a plain Faster R-CNN, convenient for the deformable-backbone-only variant).
        deform_gamma: offset scale of the deformable pooling (0.1 in the paper).
        Others as `FasterRCNN`.
    """

    def __init__(self, num_classes, roi_pooling="deform_roi_pool", deform_gamma=0.1, **kwargs):
        deform = roi_pooling == "deform_roi_pool"
        super().__init__(num_classes, roi_pooling="roi_align" if deform else roi_pooling,
                         **kwargs)
        self.deform_gamma = float(deform_gamma)
        if deform:
            plain = self.roi_extractor
            delattr(self, "roi_extractor")
            if plain in self._layers:
                self._layers.remove(plain)
            # FasterRCNN.box_branch pools through `self.roi_extractor`: swapping it is all it takes.
            self.roi_extractor = DeformRoIExtractor(
                plain.output_size, strides=plain.strides, sampling_ratio=plain.sampling_ratio,
                gamma=self.deform_gamma, min_level=plain.min_level,
                canonical_size=plain.canonical_size, canonical_level=plain.canonical_level,
                name="roi_extractor")
            self.roi_pooling = "deform_roi_pool"

    def get_config(self):
        config = super().get_config()
        config.update(deform_gamma=self.deform_gamma)
        return config


def deformable_rfcn(num_classes, backbone="resnet101_dilated", backbone_config=None,
                    modulated=False, **kwargs):
    """The Deformable ConvNets R-FCN: deformable PS-RoI pooling and, for the ResNet trunks,
    deformable convs in the dilated res5 (DCN v2 when `modulated`). Other args as `RFCN`."""
    config = dict(backbone_config or {})
    if backbone.endswith("_dilated") or backbone == "tiny_dcn":
        config.setdefault("deformable_stages", (5,))
        config.setdefault("modulated", modulated)
    kwargs.setdefault("ps_pooling", "deform_ps_roi_pool")
    return RFCN(num_classes, backbone=backbone, backbone_config=config, **kwargs)
