"""R-FCN: region-based fully convolutional networks (Dai et al. 2016), and its Deformable
ConvNets variant (deformable PS-RoI pooling, deformable res5; Dai et al. 2017).

Wiring (R-FCN section 3 and the reference implementation):
  ResNet trunk -> RPN on `rpn_level` (res4, "C4", stride 16) -> proposals -> RoI sampling
  (training) -> PSRoIHead on `feature_level` (the dilated res5, "C5" at stride 16, reduced by a
  1x1 conv to 1024 channels) -> k^2 (C + 1) class maps and 4 k^2 class-agnostic box maps ->
  PS-RoI pooling -> average voting -> softmax / box deltas. Nothing learnable runs per RoI.

Parts (kerasdet.models.two_stage): FasterRCNN's trunk and RPN, and one box stage whose extractor is
the PS head's score maps and PS-RoI pooling and whose predictor is its voting. Training is the
approximate joint training of Faster R-CNN (one backward pass through the RPN and the head,
proposals constant); losses are the RPN losses and Fast R-CNN's
multi-task loss (`box_head_losses`) on the class-agnostic deltas. RoIs are sampled as in Faster
R-CNN (`roi_batch_size` RoIs per image, 25 % foreground) with the paper's B = 128 as the default
batch, or with `roi_ohem=True` by the paper's online hard example mining: the B RoIs of highest
loss among all N proposals (N = `rpn_post_nms_top_k_train`: 300, or 2000 as in its timing
comparison).

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

from kerasdet.backbones import resnet_dcn  # noqa: F401  (registers the dilated / DCN backbones)
from kerasdet.heads.box_stage import BoxStage
from kerasdet.heads.part_config import part_config
from kerasdet.heads.psroi_head import PS_POOLINGS, PSRoIHead
from kerasdet.models.faster_rcnn import FasterRCNN

__all__ = ["RFCN", "RFCNConfig"]

_LEVELS = ("C2", "C3", "C4", "C5")
_FPN_LEVELS = ("P2", "P3", "P4", "P5", "P6")


@part_config(attribute="rfcn_config")
class RFCNConfig:
    """feature_level: backbone output the position-sensitive maps are computed from ("C5"), or
        with `fpn=True` the pyramid level ("P2".."P6").
    rpn_level: backbone output the RPN runs on ("C4", as the reference implementation; the same
        stride as `feature_level`). Ignored with `fpn=True` (the RPN then runs on P2..P6).
    pool_size: k, bins per side (7). ps_pooling: "ps_roi_pool" (paper), "ps_roi_align" or
        "deform_ps_roi_pool" (DCN). head_channels: the 1x1 conv + ReLU before the score maps (1024;
        0 to skip). score_init_std: normal init std of the score / box map convs. voting: "mean"
        (average voting, default) or "sum" (the paper's eq. 2)."""
    feature_level: str = "C5"
    rpn_level: str = "C4"
    pool_size: int = 7
    ps_pooling: str = "ps_roi_pool"
    head_channels: int = 1024
    score_init_std: float = 0.01
    voting: str = "mean"


@keras.saving.register_keras_serializable(package="kerasdet")
class RFCN(FasterRCNN):
    """R-FCN (with `ps_pooling="deform_ps_roi_pool"` and a deformable backbone: Deformable R-FCN).

    Arguments: RFCNConfig's, `deform_gamma` (offset scale of the deformable PS-RoI pooling),
    `roi_sampling_ratio` (samples per bin side of the bilinear poolings), and FasterRCNN's
    backbone, FPN (an option beyond the paper: the PS maps from one FPN level), anchor, RPN,
    sampling and test settings; its box-head and pooling arguments do not apply. Defaults follow
    the paper: ResNet-101 with a dilated res5, 300 RoIs after NMS in training and testing, B = 128
    RoIs per image.
    """

    settings = FasterRCNN.settings + (RFCNConfig,)
    setting_defaults = {"backbone": "resnet101_dilated", "fpn": False, "roi_batch_size": 128,
                        "rpn_post_nms_top_k_train": 300, "rpn_post_nms_top_k_test": 300}
    excluded_settings = ("box_head", "fc_dim", "class_agnostic", "roi_pooling", "roi_output_size",
                         "feature")

    def build_parts(self):
        c = self.rfcn_config
        fpn = self.faster_rcnn_config.fpn
        checks = (("feature_level", c.feature_level, _FPN_LEVELS),) if fpn else \
            (("feature_level", c.feature_level, _LEVELS), ("rpn_level", c.rpn_level, _LEVELS))
        for name, level, allowed in checks:
            if level not in allowed:
                raise ValueError(f"RFCN: `{name}` must be one of {allowed}"
                                 f"{' with fpn=True' if fpn else ''}, got {level!r}")
        if c.ps_pooling not in PS_POOLINGS:
            raise ValueError(f"RFCN: `ps_pooling` must be one of {PS_POOLINGS}, got "
                             f"{c.ps_pooling!r}")
        return super().build_parts()

    @property
    def feature_level(self):
        return self.rfcn_config.feature_level

    @property
    def rpn_level(self):
        return None if self.use_fpn else self.rfcn_config.rpn_level

    @property
    def ps_pooling(self):
        return self.rfcn_config.ps_pooling

    def build_box_stages(self):
        """One stage: the PS head's score maps and pooling as the extractor, its voting as the
        predictor (class-agnostic deltas)."""
        c = self.rfcn_config
        strides = dict(self.backbone.strides)
        rpn_level = c.rpn_level
        if self.use_fpn:  # FasterRCNN's FPN levels P2..P6 carry the anchor strides
            strides = {f"P{k}": s for k, s in zip(range(2, 7), self.anchor_strides)}
            rpn_level = c.feature_level
        for level in (c.feature_level, rpn_level):
            if level not in strides:
                raise ValueError(f"RFCN: backbone {self.faster_rcnn_config.backbone!r} has no "
                                 f"output {level!r} (outputs: {sorted(strides)})")
        if not self.use_fpn and strides[rpn_level] != self.anchor_strides[0]:
            raise ValueError(f"RFCN: `anchor_strides` {self.anchor_strides} must equal the stride "
                             f"{strides[rpn_level]} of rpn_level {rpn_level!r}")
        if strides[rpn_level] != strides[c.feature_level]:
            # The proposals are in image pixels, so any strides would work for pooling; the
            # paper shares one stride-16 map size, and mismatches are almost always a mistake.
            raise ValueError(f"RFCN: rpn_level {rpn_level!r} (stride {strides[rpn_level]}) and "
                             f"feature_level {c.feature_level!r} (stride "
                             f"{strides[c.feature_level]}) must have the same stride; use a "
                             "dilated backbone for C5")
        self.ps_head = PSRoIHead(self.num_classes, pool_size=c.pool_size,
                                 stride=strides[c.feature_level], head_channels=c.head_channels,
                                 pooling=c.ps_pooling, sampling_ratio=self.roi_config.sampling_ratio,
                                 gamma=self.deform_config.gamma, score_init_std=c.score_init_std,
                                 voting=c.voting, name="ps_head")
        return [BoxStage(self.ps_head.pool, self.ps_head.vote, None,
                         self.output_config.box_weights, self.roi_config.foreground_iou)]

    def features(self, images, training=False):
        """([RPN feature maps], PS-head feature map)."""
        if self.use_fpn:
            levels, _ = super().features(images, training=training)
            return levels, levels[int(self.feature_level[1:]) - 2]
        outputs = self.backbone(images, training=training)
        return [outputs[self.rpn_level]], outputs[self.feature_level]
