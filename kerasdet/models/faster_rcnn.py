"""Faster R-CNN (Ren et al. 2015) with a ResNet C4 head or with FPN (Lin et al. 2017).

The model wires shared parts: backbone -> [FPN] -> RPN -> proposals -> RoI sampling (training) ->
RoI features -> box head -> box predictor. Training is the approximate joint training of the paper
(section 3.2): one backward pass through both stages, proposals treated as constants. The 4-step
alternating recipe is documented in train/ (docs/TRAINING.md).
"""
import keras
import tensorflow as tf

from kerasdet import backbones as kd_backbones
from kerasdet import ops
from kerasdet.heads.box_head import BoxPredictor, TwoFCHead
from kerasdet.heads.box_outputs import box_head_losses, decode_detections
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.heads.roi_sampler import sample_rois
from kerasdet.heads.rpn import RPNHead, generate_proposals, rpn_losses, rpn_targets
from kerasdet.models.base import Detector, batch_image_shapes, ground_truth, ground_truth_crowd
from kerasdet.necks.fpn import FPN

__all__ = ["FasterRCNN"]

_FPN_LEVELS = ("C2", "C3", "C4", "C5")


@keras.saving.register_keras_serializable(package="kerasdet")
class FasterRCNN(Detector):
    """Faster R-CNN.

    Args:
        num_classes: number of object classes K (background is added internally).
        backbone: registered backbone name (kerasdet.backbones.list()); backbone_config its kwargs.
        fpn: True for FPN (P2..P6 RPN, P2..P5 RoI pooling, 2fc head); False for the single-map C4
            design (RPN and RoI pooling on C4 at stride 16).
        fpn_channels: FPN width (256 in the paper).
        box_head: "2fc" (FPN's head, `fc_dim` units) or "res5" (the ResNet conv5 stage applied to
            14x14 pooled RoIs, then average pooling: the C4 model of the paper's ResNet variant).
        anchor_sizes / anchor_ratios / anchor_strides: per level; defaults are the papers' (FPN:
            32..512 on strides 4..64; C4: 128/256/512 at stride 16 — Detectron adds 32 and 64).
        anchor_offset / anchor_rounding: anchor centres at (cell + offset) * stride and whole-pixel
            rounding of the cell anchors; (0.0, True) reproduces torchvision's anchors, which its
            checkpoints need (kerasdet.converters sets them).
        rpn_*: training and test settings of the RPN (section 3.1.3 / FPN section 5.1).
        roi_*: RoI sampling (Fast R-CNN section 2.3) and pooling settings; roi_aligned is
            RoIAlign's half-pixel shift (True as Detectron2; torchvision's checkpoints use False).
        box_weights: box-coder weights of the second stage.
        class_agnostic: one box per RoI instead of one per class.
        score_threshold / nms_iou / max_detections: test-time post-processing.
    """

    loss_names = ("rpn_cls", "rpn_box", "roi_cls", "roi_box")

    def __init__(self, num_classes, backbone="resnet50", backbone_config=None, fpn=True,
                 fpn_channels=256, box_head="2fc", fc_dim=1024,
                 anchor_sizes=None, anchor_ratios=(0.5, 1.0, 2.0), anchor_strides=None,
                 anchor_offset=0.5, anchor_rounding=False, rpn_channels=None, rpn_positive_iou=0.7, rpn_negative_iou=0.3,
                 rpn_batch_size=256, rpn_positive_fraction=0.5,
                 rpn_pre_nms_top_k_train=2000, rpn_post_nms_top_k_train=1000,
                 rpn_pre_nms_top_k_test=1000, rpn_post_nms_top_k_test=1000,
                 rpn_nms_iou=0.7, rpn_min_size=0.0,
                 roi_batch_size=512, roi_positive_fraction=0.25, roi_foreground_iou=0.5,
                 roi_background_iou_low=0.0, roi_pooling="roi_align", roi_output_size=None,
                 roi_sampling_ratio=0, roi_aligned=True, box_weights=(10.0, 10.0, 5.0, 5.0), class_agnostic=False,
                 score_threshold=0.05, nms_iou=0.5, max_detections=100, seed=None, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.backbone_name = backbone
        self.backbone_config = dict(backbone_config or {})
        self.use_fpn = bool(fpn)
        self.fpn_channels = int(fpn_channels)
        self.box_head_kind = box_head
        self.fc_dim = int(fc_dim)
        if box_head not in ("2fc", "res5"):
            raise ValueError(f"`box_head` must be '2fc' or 'res5', got {box_head!r}.")
        if box_head == "res5" and self.use_fpn:
            raise ValueError("`box_head='res5'` is the C4 design; use it with fpn=False.")

        if self.use_fpn:
            self.anchor_strides = tuple(anchor_strides or (4, 8, 16, 32, 64))
            self.anchor_sizes = tuple(tuple(s) for s in (anchor_sizes or
                                                         ((32,), (64,), (128,), (256,), (512,))))
        else:
            self.anchor_strides = tuple(anchor_strides or (16,))
            self.anchor_sizes = tuple(tuple(s) for s in (anchor_sizes or ((128, 256, 512),)))
        self.anchor_ratios = tuple(anchor_ratios)
        self.anchor_offset = float(anchor_offset)
        self.anchor_rounding = bool(anchor_rounding)
        self.anchor_generator = ops.AnchorGenerator(self.anchor_strides, self.anchor_sizes,
                                                    self.anchor_ratios, offset=self.anchor_offset,
                                                    rounded=self.anchor_rounding)

        self.rpn_settings = dict(
            positive_iou=rpn_positive_iou, negative_iou=rpn_negative_iou,
            batch_size=rpn_batch_size, positive_fraction=rpn_positive_fraction,
            pre_nms_top_k_train=rpn_pre_nms_top_k_train,
            post_nms_top_k_train=rpn_post_nms_top_k_train,
            pre_nms_top_k_test=rpn_pre_nms_top_k_test, post_nms_top_k_test=rpn_post_nms_top_k_test,
            nms_iou=rpn_nms_iou, min_size=rpn_min_size)
        self.roi_settings = dict(
            batch_size=roi_batch_size, positive_fraction=roi_positive_fraction,
            foreground_iou=roi_foreground_iou, background_iou_low=roi_background_iou_low)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.class_agnostic = bool(class_agnostic)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        self.seed = seed

        self.backbone = kd_backbones.get(backbone, **self.backbone_config)
        if self.use_fpn:
            self.neck = FPN(self.fpn_channels, input_levels=_FPN_LEVELS, name="fpn")
            rpn_in = self.fpn_channels
            pool_strides = self.anchor_strides[:4]
        else:
            self.neck = None
            pool_strides = (self.backbone.strides["C4"],)
            rpn_in = None
        num_anchors = self.anchor_generator.num_anchors_per_location
        if len(set(num_anchors)) != 1:
            raise ValueError("Every level must have the same number of anchors per location.")
        self.rpn_channels = int(rpn_channels or rpn_in or 512)
        self.rpn_head = RPNHead(num_anchors[0], channels=self.rpn_channels, name="rpn")
        self.roi_pooling = roi_pooling
        self.roi_output_size = int(roi_output_size or (14 if box_head == "res5" else 7))
        self.roi_sampling_ratio = int(roi_sampling_ratio)
        self.roi_aligned = bool(roi_aligned)
        self.roi_extractor = RoIExtractor(self.roi_output_size, strides=pool_strides,
                                          method=roi_pooling, sampling_ratio=roi_sampling_ratio,
                                          aligned=self.roi_aligned,
                                          name="roi_extractor")
        if box_head == "res5":
            self.box_head = kd_backbones.ResNetConv5Head(
                frozen_bn=self.backbone_config.get("frozen_bn", True),
                input_channels=self.backbone.output["C4"].shape[-1], global_pool=True,
                name="res5_head")
        else:
            self.box_head = TwoFCHead(self.fc_dim, name="box_head")
        self.box_predictor = BoxPredictor(num_classes, class_agnostic=self.class_agnostic,
                                          name="box_predictor")
        self.sampling_seed = keras.random.SeedGenerator(seed, name="sampling_seed")

    # -- building blocks ------------------------------------------------------------------------
    def features(self, images, training=False):
        """(RPN feature maps, RoI-pooling feature maps), shallowest first."""
        outputs = self.backbone(images, training=training)
        if self.use_fpn:
            pyramid = self.neck({k: outputs[k] for k in _FPN_LEVELS})
            levels = [pyramid[f"P{k}"] for k in range(2, 7)]
            return levels, levels[:4]
        return [outputs["C4"]], [outputs["C4"]]

    def rpn(self, rpn_features):
        logits, deltas = self.rpn_head(rpn_features)
        anchors = self.anchor_generator([tf.shape(f)[1:3] for f in rpn_features])
        return logits, deltas, anchors

    def proposals(self, logits, deltas, anchors, image_shapes, training):
        s = self.rpn_settings
        pre = s["pre_nms_top_k_train"] if training else s["pre_nms_top_k_test"]
        post = s["post_nms_top_k_train"] if training else s["post_nms_top_k_test"]
        return generate_proposals(logits, deltas, anchors, image_shapes, pre, post,
                                  nms_iou=s["nms_iou"], min_size=s["min_size"])

    def box_branch(self, roi_features, rois, training=False):
        pooled = self.roi_extractor(roi_features, rois)
        if self.box_head_kind == "res5":
            shape = tf.shape(pooled)
            flat = tf.reshape(pooled, [-1, self.roi_output_size, self.roi_output_size,
                                       pooled.shape[-1]])
            hidden = self.box_head(flat, training=training)
            hidden = tf.reshape(hidden, [shape[0], shape[1], hidden.shape[-1]])
        else:
            hidden = self.box_head(pooled)
        return self.box_predictor(hidden)

    # -- the two halves of a two-stage detector, shared by its subclasses ------------------------
    def first_stage(self, batch, training):
        """Everything up to the proposals in training: returns a context dict with `batch`,
        `images`, `image_shapes`, `gt_boxes`, `gt_labels` (padded, label -1), `gt_crowd` (the
        ``iscrowd`` flags the samplers ignore regions by), `roi_features`,
        `proposals`, `proposal_valid`, and `losses` holding the RPN losses."""
        images = tf.cast(batch["images"], self.compute_dtype)
        image_shapes = batch_image_shapes(batch, images)
        gt_boxes, gt_labels = ground_truth(batch)
        gt_crowd = ground_truth_crowd(batch)
        rpn_features, roi_features = self.features(images, training=training)
        logits, deltas, anchors = self.rpn(rpn_features)
        s = self.rpn_settings
        labels, targets = rpn_targets(
            tf.concat(anchors, 0), gt_boxes, gt_labels, image_shapes,
            positive_iou=s["positive_iou"], negative_iou=s["negative_iou"],
            num_samples=s["batch_size"], positive_fraction=s["positive_fraction"],
            seed=self.sampling_seed, gt_crowd=gt_crowd)
        losses = rpn_losses(tf.concat(logits, 1), tf.concat(deltas, 1), labels, targets)
        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shapes, training)
        return dict(batch=batch, images=images, image_shapes=image_shapes, gt_boxes=gt_boxes,
                    gt_labels=gt_labels, gt_crowd=gt_crowd, roi_features=roi_features,
                    proposals=proposals, proposal_valid=valid, losses=losses)

    def sample_training_rois(self, context, foreground_iou=None):
        """The second stage's training RoIs (sample_rois on the context's proposals)."""
        r = self.roi_settings
        return sample_rois(context["proposals"], context["proposal_valid"], context["gt_boxes"],
                           context["gt_labels"], num_samples=r["batch_size"],
                           positive_fraction=r["positive_fraction"],
                           foreground_iou=foreground_iou or r["foreground_iou"],
                           background_iou_low=r["background_iou_low"], seed=self.sampling_seed,
                           gt_crowd=context.get("gt_crowd"))

    def second_stage_losses(self, context, training):
        """Losses of everything after the proposals; subclasses extend or replace this."""
        sampled = self.sample_training_rois(context)
        context["sampled"] = sampled
        cls_logits, box_deltas = self.box_branch(context["roi_features"], sampled["rois"],
                                                 training=training)
        cls_loss, box_loss = box_head_losses(cls_logits, box_deltas, sampled,
                                             weights=self.box_weights)
        return {"roi_cls": cls_loss, "roi_box": box_loss}

    def first_stage_inference(self, images, image_shapes, training=False):
        """(roi_features, proposals, proposal_valid) at test time."""
        rpn_features, roi_features = self.features(images, training=training)
        logits, deltas, anchors = self.rpn(rpn_features)
        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shapes, False)
        return roi_features, proposals, valid

    def detect_boxes(self, roi_features, proposals, valid, image_shapes, training=False):
        """The box branch on the proposals, decoded and NMSed: the predict dict."""
        cls_logits, box_deltas = self.box_branch(roi_features, proposals, training=training)
        return decode_detections(
            tf.nn.softmax(tf.cast(cls_logits, tf.float32)), tf.cast(box_deltas, tf.float32),
            proposals, valid, image_shapes, weights=self.box_weights,
            score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_detections=self.max_detections)

    # -- Detector interface ---------------------------------------------------------------------
    def compute_detection_losses(self, batch, training):
        context = self.first_stage(batch, training)
        losses = context["losses"]
        losses.update(self.second_stage_losses(context, training))
        return losses

    def detect(self, images, image_shapes, training=False):
        roi_features, proposals, valid = self.first_stage_inference(images, image_shapes,
                                                                    training)
        return self.detect_boxes(roi_features, proposals, valid, image_shapes, training)

    def get_config(self):
        config = super().get_config()
        s, r = self.rpn_settings, self.roi_settings
        config.update(
            backbone=self.backbone_name, backbone_config=self.backbone_config, fpn=self.use_fpn,
            fpn_channels=self.fpn_channels, box_head=self.box_head_kind, fc_dim=self.fc_dim,
            anchor_sizes=[list(x) for x in self.anchor_sizes], anchor_ratios=list(self.anchor_ratios),
            anchor_strides=list(self.anchor_strides), anchor_offset=self.anchor_offset,
            anchor_rounding=self.anchor_rounding, rpn_channels=self.rpn_channels,
            rpn_positive_iou=s["positive_iou"], rpn_negative_iou=s["negative_iou"],
            rpn_batch_size=s["batch_size"], rpn_positive_fraction=s["positive_fraction"],
            rpn_pre_nms_top_k_train=s["pre_nms_top_k_train"],
            rpn_post_nms_top_k_train=s["post_nms_top_k_train"],
            rpn_pre_nms_top_k_test=s["pre_nms_top_k_test"],
            rpn_post_nms_top_k_test=s["post_nms_top_k_test"], rpn_nms_iou=s["nms_iou"],
            rpn_min_size=s["min_size"], roi_batch_size=r["batch_size"],
            roi_positive_fraction=r["positive_fraction"], roi_foreground_iou=r["foreground_iou"],
            roi_background_iou_low=r["background_iou_low"], roi_pooling=self.roi_pooling,
            roi_output_size=self.roi_output_size, roi_sampling_ratio=self.roi_sampling_ratio,
            roi_aligned=self.roi_aligned, box_weights=list(self.box_weights), class_agnostic=self.class_agnostic,
            score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_detections=self.max_detections, seed=self.seed)
        return config
