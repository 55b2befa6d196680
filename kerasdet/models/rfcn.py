"""R-FCN: region-based fully convolutional networks (Dai et al. 2016), and its Deformable
ConvNets variant (deformable PS-RoI pooling, deformable res5; Dai et al. 2017).

Wiring (R-FCN section 3 and the reference implementation):
  ResNet trunk -> RPN on `rpn_level` (res4, "C4", stride 16) -> proposals -> RoI sampling
  (training) -> PSRoIHead on `feature_level` (the dilated res5, "C5" at stride 16, reduced by a
  1x1 conv to 1024 channels) -> k^2 (C + 1) class maps and 4 k^2 class-agnostic box maps ->
  PS-RoI pooling -> average voting -> softmax / box deltas. Nothing learnable runs per RoI.

Training is the approximate joint training of Faster R-CNN (one backward pass through the RPN and
the head, proposals constant), reused from `FasterRCNN`; losses are the RPN losses and Fast R-CNN's
multi-task loss (`box_head_losses`) on the class-agnostic deltas. Online hard example mining
(the paper's OHEM) is NOT implemented: RoIs are sampled as in Faster R-CNN (`roi_batch_size`
RoIs per image, 25 % foreground), with the paper's B = 128 as the default batch.

Backbones: "resnet101_dilated" / "resnet50_dilated" (kerasdet.backbones.resnet_dcn) are the
paper's trunk (res5 with stride 16 and dilation 2). For tests, "tiny_dcn" with
`output_stride=16` gives the same layout at toy size (C4 and C5 both at stride 16); the plain
"tiny" backbone works with feature_level="C4" (stride 16) or any level whose stride is given.
Measured on the synthetic learning benchmark: the single-map layout on a from-scratch toy trunk
does not learn within the test budget (mAP@0.5 ~0 after 4 epochs; Faster R-CNN's 2fc head on the
same single map reaches only 0.08), so the learning test uses the `fpn=True` option (PS maps on P2)
with summed class votes (`voting="sum"`, the paper's eq. 2).
"""
import keras
import tensorflow as tf

from kerasdet.backbones import resnet_dcn  # noqa: F401  (registers the dilated / DCN backbones)
from kerasdet.heads.psroi_head import PS_POOLINGS, PSRoIHead
from kerasdet.models.faster_rcnn import FasterRCNN

__all__ = ["RFCN"]

_NOT_RFCN_ARGS = ("box_head", "fc_dim", "class_agnostic", "roi_pooling", "roi_output_size")
_LEVELS = ("C2", "C3", "C4", "C5")
_FPN_LEVELS = ("P2", "P3", "P4", "P5", "P6")


@keras.saving.register_keras_serializable(package="kerasdet")
class RFCN(FasterRCNN):
    """R-FCN (with `ps_pooling="deform_ps_roi_pool"` and a deformable backbone: Deformable R-FCN).

    Args:
        num_classes: object classes C (background is added internally).
        backbone, backbone_config: registered backbone and its kwargs (default the paper's
            ResNet-101 with a dilated res5).
        feature_level: backbone output the position-sensitive maps are computed from ("C5"), or
            with `fpn=True` the pyramid level ("P2".."P6").
        rpn_level: backbone output the RPN runs on ("C4", as the reference implementation; the
            same stride as `feature_level` is required by the shared anchors / proposals).
            Ignored with `fpn=True` (the RPN then runs on P2..P6 as in FPN).
        fpn, fpn_channels: an option beyond the paper: the PS maps are computed from one level of
            an FPN (P_k merges the top-down semantics, which a small trunk trained from scratch
            lacks); the RPN is FPN's. Default False (the paper's single-map R-FCN).
        pool_size: k, bins per side (7).
        ps_pooling: "ps_roi_pool" (paper), "ps_roi_align" or "deform_ps_roi_pool" (DCN).
        head_channels: the 1x1 conv + ReLU before the score maps (1024; 0 to skip).
        score_init_std: normal init std of the score / box map convs.
        deform_gamma: offset scale of the deformable PS-RoI pooling (0.1).
        voting: "mean" (average voting, default) or "sum" (the paper's eq. 2).
        roi_sampling_ratio: samples per bin side of the bilinear poolings (0 = adaptive).
        Other keyword arguments as `FasterRCNN` (RPN, sampling and test settings); the FPN and
        box-head arguments of `FasterRCNN` do not apply. Defaults follow the paper: 300 RoIs
        after NMS in training and testing, B = 128 RoIs per image.
    """

    loss_names = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")

    def __init__(self, num_classes, backbone="resnet101_dilated", backbone_config=None,
                 feature_level="C5", rpn_level="C4", fpn=False, pool_size=7,
                 ps_pooling="ps_roi_pool",
                 head_channels=1024, score_init_std=0.01, deform_gamma=0.1, voting="mean",
                 roi_batch_size=128, rpn_post_nms_top_k_train=300, rpn_post_nms_top_k_test=300,
                 **kwargs):
        bad = sorted(k for k in _NOT_RFCN_ARGS if k in kwargs)
        if bad:
            raise ValueError(f"RFCN: arguments {bad} belong to FasterRCNN's box heads and do not "
                             "apply to R-FCN.")
        checks = (("feature_level", feature_level, _FPN_LEVELS),) if fpn else \
            (("feature_level", feature_level, _LEVELS), ("rpn_level", rpn_level, _LEVELS))
        for name, level, allowed in checks:
            if level not in allowed:
                raise ValueError(f"RFCN: `{name}` must be one of {allowed}"
                                 f"{' with fpn=True' if fpn else ''}, got {level!r}")
        if ps_pooling not in PS_POOLINGS:
            raise ValueError(f"RFCN: `ps_pooling` must be one of {PS_POOLINGS}, got {ps_pooling!r}")
        super().__init__(num_classes, backbone=backbone, backbone_config=backbone_config,
                         fpn=fpn, box_head="2fc", class_agnostic=True,
                         roi_batch_size=roi_batch_size,
                         rpn_post_nms_top_k_train=rpn_post_nms_top_k_train,
                         rpn_post_nms_top_k_test=rpn_post_nms_top_k_test, **kwargs)
        # FasterRCNN's RoI extractor and 2fc head are replaced by the PS head: drop them so that
        # they neither appear among the layers nor get saved.
        for attr in ("box_head", "box_predictor", "roi_extractor"):
            layer = getattr(self, attr)
            delattr(self, attr)
            if layer in self._layers:
                self._layers.remove(layer)
        strides = dict(self.backbone.strides)
        if fpn:
            # FasterRCNN's FPN levels P2..P6 carry the anchor strides.
            strides = {f"P{k}": s for k, s in zip(range(2, 7), self.anchor_strides)}
            rpn_level = feature_level
        for level in (feature_level, rpn_level):
            if level not in strides:
                raise ValueError(f"RFCN: backbone {backbone!r} has no output {level!r} "
                                 f"(outputs: {sorted(strides)})")
        if not fpn and strides[rpn_level] != self.anchor_strides[0]:
            raise ValueError(f"RFCN: `anchor_strides` {self.anchor_strides} must equal the stride "
                             f"{strides[rpn_level]} of rpn_level {rpn_level!r}")
        if strides[rpn_level] != strides[feature_level]:
            # The proposals are in image pixels, so any strides would work for pooling; the
            # paper shares one stride-16 map size, and mismatches are almost always a mistake.
            raise ValueError(f"RFCN: rpn_level {rpn_level!r} (stride {strides[rpn_level]}) and "
                             f"feature_level {feature_level!r} (stride {strides[feature_level]}) "
                             "must have the same stride; use a dilated backbone for C5")
        self.feature_level = feature_level
        self.rpn_level = None if fpn else rpn_level
        self.pool_size = int(pool_size)
        self.ps_pooling = ps_pooling
        self.head_channels = int(head_channels or 0)
        self.score_init_std = float(score_init_std)
        self.deform_gamma = float(deform_gamma)
        self.voting = voting
        self.ps_head = PSRoIHead(num_classes, pool_size=self.pool_size,
                                 stride=strides[feature_level], head_channels=self.head_channels,
                                 pooling=ps_pooling, sampling_ratio=self.roi_sampling_ratio,
                                 gamma=self.deform_gamma, score_init_std=self.score_init_std,
                                 voting=voting, name="ps_head")

    def features(self, images, training=False):
        """([RPN feature maps], PS-head feature map)."""
        if self.use_fpn:
            levels, _ = super().features(images, training=training)
            return levels, levels[int(self.feature_level[1:]) - 2]
        outputs = self.backbone(images, training=training)
        return [outputs[self.rpn_level]], outputs[self.feature_level]

    def box_branch(self, roi_features, rois, training=False):
        """Class logits [B, R, C + 1] and class-agnostic deltas [B, R, 1, 4] by average voting."""
        return self.ps_head(roi_features, rois)

    def get_config(self):
        config = super().get_config()
        for key in _NOT_RFCN_ARGS:
            config.pop(key, None)
        config.update(feature_level=self.feature_level, rpn_level=self.rpn_level or "C4",
                      pool_size=self.pool_size, ps_pooling=self.ps_pooling,
                      head_channels=self.head_channels, score_init_std=self.score_init_std,
                      deform_gamma=self.deform_gamma, voting=self.voting)
        return config
