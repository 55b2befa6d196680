"""Deformable ConvNets detectors (Dai et al. 2017; Zhu et al. 2019 for the modulated v2).

  * `DeformableFasterRCNN`: Faster R-CNN (FPN or C4) whose RoI features come from deformable RoI
    pooling (`kerasdet.layers.DeformRoIPool`: a RoIAlign pooling, a zero-initialized fc that
    predicts normalized bin offsets, then the pooling again at the shifted bins, offsets scaled by
    gamma = 0.1). With FPN each level has its own pooling layer (and offset fc). The pooling is a
    choice of kerasdet.heads.roi_extractor, so this is FasterRCNN with another default.
  * `deformable_rfcn(...)`: R-FCN with deformable PS-RoI pooling and deformable convs in the dilated
    res5 — the DCN paper's R-FCN — as an `RFCN` configuration.
  * Deformable convolution backbones: "resnet50_dcn", "resnet101_dcn", "resnet*_dilated" with
    `deformable_stages`, and "tiny_dcn" for tests (kerasdet.backbones.resnet_dcn).

Every deformable part starts with zero offsets, so at initialization a deformable detector computes
exactly what its plain twin (roi_align / ps_roi_align, plain convs) computes with the same weights.
"""
import keras

from kerasdet.backbones import resnet_dcn  # noqa: F401  (registers the DCN backbones)
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.rfcn import RFCN

__all__ = ["DeformableFasterRCNN", "deformable_rfcn"]


@keras.saving.register_keras_serializable(package="kerasdet")
class DeformableFasterRCNN(FasterRCNN):
    """Faster R-CNN with deformable RoI pooling (and any backbone, e.g. "resnet50_dcn").

    Arguments as `FasterRCNN`; roi_pooling defaults to "deform_roi_pool" (any other pooling gives
    a plain Faster R-CNN, convenient for the deformable-backbone-only variant) and deform_gamma
    is the offset scale (0.1 in the paper).
    """

    setting_defaults = {"roi_pooling": "deform_roi_pool"}


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
