"""Faster R-CNN (Ren et al. 2015) with a ResNet C4 head or with FPN (Lin et al. 2017).

Parts (kerasdet.models.two_stage): backbone -> [FPN] -> RPN proposals -> one box stage (RoI
extractor, 2fc or res5 head, box predictor). Training is the approximate joint training of the
paper (section 3.2): one backward pass through both stages, proposals treated as constants. The
4-step alternating recipe is documented in train/ (docs/TRAINING.md).
"""
import keras

from kerasdet import backbones as kd_backbones
from kerasdet import ops
from kerasdet.heads.box_head import BoxPredictor, TwoFCHead
from kerasdet.heads.box_outputs import OutputConfig
from kerasdet.heads.box_stage import BoxStage, roi_wise
from kerasdet.heads.part_config import part_config
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.heads.roi_sampler import RoIConfig
from kerasdet.heads.rpn import RPN, AnchorConfig, RPNConfig, RPNHead
from kerasdet.models.two_stage import TwoStageDetector
from kerasdet.necks.fpn import FPN

__all__ = ["FasterRCNN", "FasterRCNNConfig", "DeformConfig"]

_FPN_LEVELS = ("C2", "C3", "C4", "C5")


@part_config(attribute="faster_rcnn_config")
class FasterRCNNConfig:
    """backbone: registered name (kerasdet.backbones.list()), backbone_config its kwargs.
    fpn: True for FPN (P2..P6 RPN, P2..P5 RoI pooling); False for a single map: `feature`.
    feature: the backbone output the single-map layout runs the RPN and pools RoIs on ("C4" of a
    ResNet at stride 16; the paper's "conv5_3" of VGG-16 and "conv5" of ZF); unused with FPN.
    box_head: "2fc" (FPN's head, `fc_dim` units; fc6 / fc7 with 4096 as VGG-16's and ZF's) or
    "res5" (the ResNet conv5 stage on 14x14 pooled RoIs, then average pooling: the C4 model of
    the paper's ResNet variant)."""
    backbone: str = "resnet50"
    backbone_config: dict = None
    fpn: bool = True
    feature: str = "C4"
    fpn_channels: int = 256
    box_head: str = "2fc"
    fc_dim: int = 1024


@part_config("deform_")
class DeformConfig:
    """gamma: offset scale of the deformable RoI poolings (0.1 in the Deformable ConvNets paper)."""
    gamma: float = 0.1


@keras.saving.register_keras_serializable(package="kerasdet")
class FasterRCNN(TwoStageDetector):
    """Faster R-CNN.

    Arguments: `num_classes` (K; background is added internally), `seed`, and the flat settings of
    its parts: FasterRCNNConfig (backbone, backbone_config, fpn, feature, fpn_channels, box_head,
    fc_dim),
    AnchorConfig (anchor_sizes / anchor_ratios / anchor_strides / anchor_offset /
    anchor_rounding; defaults FPN 32..512 on strides 4..64, C4 128/256/512 at stride 16), RPNConfig
    (rpn_*), RoIConfig (roi_*: sampling and pooling, any pooler of kerasdet.heads.roi_extractor),
    OutputConfig (box_weights, class_agnostic, score_threshold, nms_iou, max_detections) and
    DeformConfig (deform_gamma, for roi_pooling="deform_roi_pool").
    """

    loss_names = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
    settings = (FasterRCNNConfig, AnchorConfig, RPNConfig, RoIConfig, OutputConfig, DeformConfig)

    # -- the settings most code asks for ------------------------------------------------------
    @property
    def use_fpn(self):
        return bool(self.faster_rcnn_config.fpn)

    @property
    def box_head_kind(self):
        return self.faster_rcnn_config.box_head

    @property
    def fpn_channels(self):
        return int(self.faster_rcnn_config.fpn_channels)

    @property
    def feature(self):
        """The single map's backbone output (FasterRCNNConfig.feature)."""
        return self.faster_rcnn_config.feature

    @property
    def backbone_config(self):
        return dict(self.faster_rcnn_config.backbone_config or {})

    # -- parts ----------------------------------------------------------------------------------
    def build_parts(self):
        c = self.faster_rcnn_config
        if c.box_head not in ("2fc", "res5"):
            raise ValueError(f"`box_head` must be '2fc' or 'res5', got {c.box_head!r}.")
        if c.box_head == "res5" and c.fpn:
            raise ValueError("`box_head='res5'` is the C4 design; use it with fpn=False.")
        a = self.anchor_config
        if c.fpn:
            self.anchor_strides = tuple(a.strides or (4, 8, 16, 32, 64))
            sizes = a.sizes or ((32,), (64,), (128,), (256,), (512,))
        else:
            self.anchor_strides = tuple(a.strides or (16,))
            sizes = a.sizes or ((128, 256, 512),)
        self.anchor_sizes = tuple(tuple(s) for s in sizes)
        self.anchor_generator = ops.AnchorGenerator(self.anchor_strides, self.anchor_sizes,
                                                    tuple(a.ratios), offset=float(a.offset),
                                                    rounded=bool(a.rounding))
        num_anchors = self.anchor_generator.num_anchors_per_location
        if len(set(num_anchors)) != 1:
            raise ValueError("Every level must have the same number of anchors per location.")
        self.backbone = kd_backbones.get(c.backbone, **self.backbone_config)
        if not c.fpn and c.feature not in self.backbone.strides:
            raise ValueError(f"Backbone {c.backbone!r} has no feature map {c.feature!r}; it has "
                             f"{list(self.backbone.strides)}.")
        self.neck = FPN(self.fpn_channels, input_levels=_FPN_LEVELS, name="fpn") if c.fpn else None
        width = self.rpn_config.channels or (self.fpn_channels if c.fpn else 512)
        self.rpn_head = RPNHead(num_anchors[0], channels=int(width), name="rpn")
        return dict(proposal_source=RPN(self.rpn_head, self.anchor_generator, self.rpn_config),
                    box_stages=self.build_box_stages())

    @property
    def rpn_channels(self):
        return self.rpn_head.channels

    @property
    def roi_strides(self):
        """Strides of the RoI feature maps `features` returns."""
        return self.anchor_strides[:4] if self.use_fpn else (self.backbone.strides[self.feature],)

    @property
    def roi_output_size(self):
        return int(self.roi_config.output_size or (14 if self.box_head_kind == "res5" else 7))

    def build_roi_extractor(self):
        r = self.roi_config
        return RoIExtractor(self.roi_output_size, strides=self.roi_strides, method=r.pooling,
                            sampling_ratio=r.sampling_ratio, aligned=r.aligned,
                            gamma=self.deform_config.gamma, name="roi_extractor")

    def build_box_head(self, name="box_head"):
        if self.box_head_kind == "res5":
            return kd_backbones.ResNetConv5Head(
                frozen_bn=self.backbone_config.get("frozen_bn", True),
                input_channels=self.backbone.output[self.feature].shape[-1], global_pool=True,
                name="res5_head")
        return TwoFCHead(int(self.faster_rcnn_config.fc_dim), name=name)

    def build_box_stages(self):
        """One stage: RoI extractor, box head, box predictor."""
        self.roi_extractor = self.build_roi_extractor()
        self.box_head = self.build_box_head()
        self.box_predictor = BoxPredictor(self.num_classes,
                                          class_agnostic=self.output_config.class_agnostic,
                                          name="box_predictor")
        head = roi_wise(self.box_head) if self.box_head_kind == "res5" else self.box_head
        return [BoxStage(self.roi_extractor, self.box_predictor, head,
                         self.output_config.box_weights, self.roi_config.foreground_iou)]

    # -- what the parts run on, and the pieces tests and converters call -------------------------
    def features(self, images, training=False):
        """(RPN feature maps, RoI-pooling feature maps), shallowest first."""
        outputs = self.backbone(images, training=training)
        if self.use_fpn:
            pyramid = self.neck({k: outputs[k] for k in _FPN_LEVELS}, training=training)
            levels = [pyramid[f"P{k}"] for k in range(2, 7)]
            return levels, levels[:4]
        return [outputs[self.feature]], [outputs[self.feature]]

    def rpn(self, rpn_features, training=False):
        """(objectness logits, deltas, anchors), one entry per level."""
        return self.proposal_source.outputs(rpn_features, training)

    def proposals(self, logits, deltas, anchors, image_shapes, training):
        return self.proposal_source.proposals(logits, deltas, anchors, image_shapes, training)

    def box_branch(self, roi_features, rois, training=False):
        """The first box stage on [B, R, 4] RoIs: (class logits, box deltas)."""
        return self.box_stages[0](roi_features, rois, training)
