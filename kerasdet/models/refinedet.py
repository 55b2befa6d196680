"""RefineDet (Zhang et al., "Single-Shot Refinement Neural Network for Object Detection", CVPR 2018).

    images -> backbone source maps (VGG-16: conv4_3 + L2Norm(10), conv5_3 + L2Norm(8), fc7, conv6_2;
              ResNet-101: res3b3, res4b22, res5c, res6; strides 8 / 16 / 32 / 64)
      ARM:  on each source map a 3x3 conv -> A x 4 offsets and a 3x3 conv -> A x 2 object / not-object
            scores, on the anchors (one size 4 x stride, ratios 0.5 / 1 / 2, A = 3)
      TCB:  kerasdet.necks.refinedet.TransferConnectionBlocks (top-down, 256 channels)
      ODM:  on each TCB map a 3x3 conv -> A x 4 offsets and a 3x3 conv -> A x (C + 1) class scores,
            regressed from the *refined* anchors (the anchors decoded by the ARM's offsets)

Training (sec. 3 "Training and Inference"): the ARM's anchors are matched to the ground truth (each
ground truth to its best anchor, then every anchor with IoU >= 0.5) with binary labels; the ODM's
refined anchors (decoded, not clipped, no gradient into the ARM through them) are matched and
encoded the same way with class labels. Negative anchor filtering: a refined anchor whose ARM
not-object probability is above theta = 0.99 is not an ODM negative (positives stay, as in the
reference code). Both modules use hard negative mining 3:1 and smooth L1:
L = (L_b + L_r,arm) / N_arm + (L_m + L_r,odm) / N_odm, each term 0 when its N is 0
(kerasdet.losses.multibox_loss). Box coding: centre-size with variances (0.1, 0.1, 0.2, 0.2).

Inference: anchors the ARM filters (object probability < 0.01) have their detections set to
background; the ODM's boxes are decoded against the refined anchors; then the per-image top 400,
per-class NMS 0.45, top 200, score > 0.01 (SingleShotOutputConfig; the reference code's per-class
1000 / keep 500 with ``per_class_top_k=1000, max_detections=500``).

Ablations (the paper's table 3): ``negative_filter_theta=None`` turns the filter off;
``two_step=False`` makes the ODM regress from the tiled anchors instead of the refined ones (the
paper's redesign "directly using the regularly tiled default anchors"), the ARM still trained.
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.heads.part_config import part_config
from kerasdet.heads.rpn import AnchorConfig
from kerasdet.heads.single_shot import DenseHead, negative_anchor_mask, single_shot_targets
from kerasdet.models.single_shot import SingleShotDetector, SingleShotOutputConfig
from kerasdet.necks.refinedet import TransferConnectionBlocks
from kerasdet.ops.boxes import decode_boxes

__all__ = ["RefineDet", "RefineDetConfig", "refined_anchors"]


@part_config(attribute="refinedet_config")
class RefineDetConfig:
    """backbone / backbone_config: a registered backbone and its kwargs ("vgg16_refinedet", or
    "resnet101" with {"extra_res6": true}). source_layers: its four (or L) maps, shallowest first
    (None: the backbone's RefineDet layout, kerasdet.models.single_shot.DEFAULT_SOURCE_LAYERS).
    l2_norm_scales: one initial L2Normalization scale per source map, 0 for none (None: 10 / 8 on
    VGG-16's conv4_3 / conv5_3). tcb_channels: 256. two_step: the ODM regresses from the refined
    anchors (False: from the tiled anchors). negative_filter_theta: 0.99 (None: no filter).
    iou_threshold: 0.5 for both modules. neg_pos_ratio / min_negatives: hard negative mining
    (3:1; an image without positives mines none, as the reference code). box_weights: 1 /
    variances. anchor_size_per_stride: 4 (anchor size = 4 x stride)."""
    backbone: str = "vgg16_refinedet"
    backbone_config: dict = None
    source_layers: tuple = None
    l2_norm_scales: tuple = None
    tcb_channels: int = 256
    two_step: bool = True
    negative_filter_theta: float = 0.99
    iou_threshold: float = 0.5
    neg_pos_ratio: float = 3.0
    min_negatives: int = 0
    box_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    anchor_size_per_stride: float = 4.0


def refined_anchors(anchors, arm_deltas, box_weights):
    """The ARM's refined anchors: `anchors` [N, 4] decoded by `arm_deltas` [B, N, 4], not clipped,
    without gradient (the ODM's matching and decoding treat them as constants)."""
    deltas = tf.stop_gradient(tf.cast(arm_deltas, tf.float32))
    return decode_boxes(deltas, tf.cast(anchors, tf.float32)[tf.newaxis], box_weights)


@keras.saving.register_keras_serializable(package="kerasdet")
class RefineDet(SingleShotDetector):
    """RefineDet. Arguments: `num_classes` (C; background is added internally), `seed`, and the
    flat settings of RefineDetConfig (backbone, backbone_config, source_layers, l2_norm_scales,
    tcb_channels, two_step, negative_filter_theta, iou_threshold, neg_pos_ratio, min_negatives,
    box_weights, anchor_size_per_stride), AnchorConfig (anchor_sizes / anchor_ratios /
    anchor_strides / anchor_offset / anchor_rounding) and SingleShotOutputConfig
    (score_threshold, nms_iou, pre_nms_top_k, max_detections, per_class_top_k)."""

    loss_names = ("arm_cls", "arm_box", "odm_cls", "odm_box")
    settings = (RefineDetConfig, AnchorConfig, SingleShotOutputConfig)

    def build_parts(self):
        c = self.refinedet_config
        sources = self.build_backbone_sources(c.backbone, c.backbone_config, c.source_layers,
                                              c.l2_norm_scales)
        num_anchors = self.build_anchor_generator(self.anchor_config, float(c.anchor_size_per_stride))
        levels = len(sources)
        self.box_weights = tuple(float(w) for w in c.box_weights)
        self.tcb = TransferConnectionBlocks(sources, channels=int(c.tcb_channels), name="tcb")
        self.arm_loc = DenseHead(num_anchors, 4, levels, name="arm_loc")
        self.arm_conf = DenseHead(num_anchors, 2, levels, name="arm_conf")
        self.odm_loc = DenseHead(num_anchors, 4, levels, name="odm_loc")
        self.odm_conf = DenseHead(num_anchors, self.num_classes + 1, levels, name="odm_conf")

    @property
    def negative_filter_theta(self):
        return self.refinedet_config.negative_filter_theta

    # -- the network ------------------------------------------------------------------------------
    def head_outputs(self, images, training=False):
        """dict: anchors [N, 4], arm_deltas [B, N, 4], arm_logits [B, N, 2], odm_deltas [B, N, 4],
        odm_logits [B, N, C + 1] (float32: the losses and decoding run in float32 under a mixed
        policy)."""
        maps = self.source_maps(images, training)
        odm_maps = self.tcb(dict(zip(self.source_layers, maps)), training=training)
        odm_maps = [odm_maps[name] for name in self.tcb.output_names]
        f32 = lambda x: tf.cast(x, tf.float32)  # noqa: E731
        return {"anchors": self.anchors(maps),
                "arm_deltas": f32(self.arm_loc(maps)), "arm_logits": f32(self.arm_conf(maps)),
                "odm_deltas": f32(self.odm_loc(odm_maps)),
                "odm_logits": f32(self.odm_conf(odm_maps))}

    def odm_anchors(self, outputs):
        """[B, N, 4] anchors the ODM regresses from: the refined ones (or the tiled ones)."""
        if self.refinedet_config.two_step:
            return refined_anchors(outputs["anchors"], outputs["arm_deltas"], self.box_weights)
        batch = tf.shape(outputs["arm_deltas"])[0]
        return tf.tile(outputs["anchors"][tf.newaxis], [batch, 1, 1])

    def filtered_anchors(self, outputs):
        """bool [B, N] of the negative anchor filter, or None when it is off."""
        theta = self.negative_filter_theta
        return None if theta is None else negative_anchor_mask(outputs["arm_logits"], theta)

    # -- training ---------------------------------------------------------------------------------
    def targets(self, outputs, gt_boxes, gt_labels):
        """(ARM class / box targets, ODM class / box targets), the ODM's with the filter applied
        (filtered negatives get class target -1, never selected by the mining)."""
        c = self.refinedet_config
        arm_cls, arm_box, _ = single_shot_targets(outputs["anchors"], gt_boxes, gt_labels,
                                                  self.box_weights, c.iou_threshold, binary=True)
        odm_cls, odm_box, positive = single_shot_targets(self.odm_anchors(outputs), gt_boxes,
                                                         gt_labels, self.box_weights,
                                                         c.iou_threshold)
        filtered = self.filtered_anchors(outputs)
        if filtered is not None:
            odm_cls = tf.where(filtered & ~positive, -1, odm_cls)
        return arm_cls, arm_box, odm_cls, odm_box

    def compute_detection_losses(self, batch, training):
        images = tf.cast(batch["images"], self.compute_dtype)
        gt_boxes, gt_labels = self.ground_truth(batch)
        return self.losses_from_outputs(self.head_outputs(images, training), gt_boxes, gt_labels)

    def losses_from_outputs(self, outputs, gt_boxes, gt_labels):
        """The four loss terms from `head_outputs`: each module's classification and box terms
        divided by that module's number of positive anchors (0 when it has none)."""
        c = self.refinedet_config
        arm_cls, arm_box, odm_cls, odm_box = self.targets(outputs, gt_boxes, gt_labels)
        mining = dict(neg_pos_ratio=float(c.neg_pos_ratio), min_negatives=int(c.min_negatives))
        arm = kd_losses.multibox_loss(arm_cls, outputs["arm_logits"], arm_box,
                                      outputs["arm_deltas"], **mining)
        odm = kd_losses.multibox_loss(odm_cls, outputs["odm_logits"], odm_box,
                                      outputs["odm_deltas"], **mining)
        return {"arm_cls": arm["classification"], "arm_box": arm["box"],
                "odm_cls": odm["classification"], "odm_box": odm["box"]}

    # -- inference --------------------------------------------------------------------------------
    def detect(self, images, image_shapes, training=False):
        return self.detections_from_outputs(self.head_outputs(images, training), image_shapes)

    def detections_from_outputs(self, outputs, image_shapes):
        """The predict dict from `head_outputs`: filter, decode against the ODM's anchors, NMS."""
        boxes = decode_boxes(outputs["odm_deltas"], self.odm_anchors(outputs), self.box_weights)
        probs = tf.nn.softmax(outputs["odm_logits"], axis=-1)
        return self.output_config.detections(boxes, probs, image_shapes,
                                             self.filtered_anchors(outputs))
