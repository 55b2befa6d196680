"""Region Proposal Network (Faster R-CNN): head, training targets and proposal generation.

The head is a 3x3 conv followed by two sibling 1x1 convs, one objectness logit and four box deltas per
anchor, shared by every pyramid level (FPN). Objectness uses one sigmoid logit per anchor rather than the
paper's two-way softmax: the two are equivalent for a binary decision and the sigmoid halves the channels
(the choice of the reference implementations, Detectron and torchvision).
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet import ops
from kerasdet.heads.part_config import part_config
from kerasdet.layers.pointwise import PointwiseConv2D
from kerasdet.layers.winograd import WinogradConv2D

__all__ = ["AnchorConfig", "RPNConfig", "RPN", "RPNHead", "rpn_targets", "rpn_losses",
           "generate_proposals"]


@part_config("anchor_")
class AnchorConfig:
    """Anchors per level (None: the detector's layout picks the papers' defaults). offset /
    rounding: centres at (cell + offset) * stride and whole-pixel cell anchors; (0.0, True) are
    torchvision's, which its checkpoints need."""
    sizes: tuple = None
    ratios: tuple = (0.5, 1.0, 2.0)
    strides: tuple = None
    offset: float = 0.5
    rounding: bool = False


@part_config("rpn_")
class RPNConfig:
    """Training and test settings of the RPN (Faster R-CNN section 3.1.3, FPN section 5.1).
    channels: width of the 3x3 conv (None: the feature maps' width, 512 on a single map).
    ignore_cross_boundary: training ignores (label -1) the anchors that cross the image border,
    as the Faster R-CNN paper does (section 3.3: about 6000 of 20000 anchors of a 1000 x 600
    image remain); off by default, as Detectron / torchvision, whose checkpoints kerasdet takes.
    Proposals are clipped to the image either way."""
    channels: int = None
    positive_iou: float = 0.7
    negative_iou: float = 0.3
    batch_size: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_k_train: int = 2000
    post_nms_top_k_train: int = 1000
    pre_nms_top_k_test: int = 1000
    post_nms_top_k_test: int = 1000
    nms_iou: float = 0.7
    min_size: float = 0.0
    ignore_cross_boundary: bool = False


class RPN:
    """The proposal source of Faster R-CNN: `RPNHead` on the proposal feature maps, its anchors,
    training targets and losses, and the proposals handed to the RoI stages.

    A proposal source answers `with_losses(maps, context, seed, training)` -> (proposals, valid,
    losses) and `inference(maps, inputs, image_shapes)` -> (proposals, valid); `input_keys` names
    the batch entries it reads (none here).
    """

    input_keys = ()

    def __init__(self, head, anchor_generator, config):
        self.head = head
        self.anchor_generator = anchor_generator
        self.config = config

    def outputs(self, maps, training=False):
        """(logits per level, deltas per level, anchors per level), all float32."""
        logits, deltas = self.head(maps, training=training)
        # Under a mixed policy the head computes in float16 / bfloat16; the ranking, decoding,
        # NMS and losses run in float32 (the -1e9 score of a dropped box is -inf in float16).
        logits = [tf.cast(x, tf.float32) for x in logits]
        deltas = [tf.cast(x, tf.float32) for x in deltas]
        anchors = self.anchor_generator([tf.shape(f)[1:3] for f in maps])
        return logits, deltas, anchors

    def proposals(self, logits, deltas, anchors, image_shapes, training):
        c = self.config
        pre = c.pre_nms_top_k_train if training else c.pre_nms_top_k_test
        post = c.post_nms_top_k_train if training else c.post_nms_top_k_test
        return generate_proposals(logits, deltas, anchors, image_shapes, pre, post,
                                  nms_iou=c.nms_iou, min_size=c.min_size)

    def with_losses(self, maps, context, seed, training):
        c = self.config
        logits, deltas, anchors = self.outputs(maps, training)
        labels, targets = rpn_targets(
            tf.concat(anchors, 0), context["gt_boxes"], context["gt_labels"],
            context["image_shapes"], positive_iou=c.positive_iou, negative_iou=c.negative_iou,
            num_samples=c.batch_size, positive_fraction=c.positive_fraction,
            ignore_cross_boundary=bool(c.ignore_cross_boundary), seed=seed,
            gt_crowd=context["gt_crowd"])
        losses = rpn_losses(tf.concat(logits, 1), tf.concat(deltas, 1), labels, targets)
        proposals, _, valid = self.proposals(logits, deltas, anchors, context["image_shapes"],
                                             training)
        return proposals, valid, losses

    def inference(self, maps, inputs, image_shapes):
        logits, deltas, anchors = self.outputs(maps)
        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shapes, False)
        return proposals, valid


@keras.saving.register_keras_serializable(package="kerasdet")
class RPNHead(keras.layers.Layer):
    """Objectness logits and box deltas for `num_anchors` anchors at every location of each level.

    Call on a list of feature maps [B, H_l, W_l, C]; returns (logits, deltas), two lists with
    [B, H_l * W_l * A] and [B, H_l * W_l * A, 4], in the anchor order of kerasdet.ops anchors
    (location-major, then anchor type).
    """

    def __init__(self, num_anchors, channels=256, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = WinogradConv2D(self.channels, 3, padding="same", activation="relu",
                                   kernel_initializer=init, name="conv")
        self.objectness = PointwiseConv2D(self.num_anchors, kernel_initializer=init, name="objectness")
        self.box = PointwiseConv2D(4 * self.num_anchors, kernel_initializer=init, name="box")

    def build(self, input_shape):
        shape = input_shape[0] if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else input_shape
        self.conv.build(shape)
        hidden = tuple(shape[:-1]) + (self.channels,)
        self.objectness.build(hidden)
        self.box.build(hidden)

    def call(self, features, training=None):
        if not isinstance(features, (list, tuple)):
            features = [features]
        logits, deltas = [], []
        for feature in features:
            hidden = self.conv(feature, training=training)
            batch = tf.shape(feature)[0]
            logits.append(tf.reshape(self.objectness(hidden, training=training), [batch, -1]))
            deltas.append(tf.reshape(self.box(hidden, training=training), [batch, -1, 4]))
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update(num_anchors=self.num_anchors, channels=self.channels)
        return config


def rpn_targets(anchors, gt_boxes, gt_labels, image_shapes, positive_iou=0.7, negative_iou=0.3,
                num_samples=256, positive_fraction=0.5, allow_low_quality=True,
                ignore_cross_boundary=False, weights=(1.0, 1.0, 1.0, 1.0), seed=None,
                gt_crowd=None, crowd_ioa_threshold=ops.CROWD_IOA_THRESHOLD):
    """Anchor labels and regression targets for the RPN loss (Faster R-CNN section 3.1.2).

    Args:
        anchors: [A, 4] anchors of all levels, concatenated in the order of the head's outputs.
        gt_boxes: [B, N, 4]; gt_labels: [B, N] with -1 for padding.
        image_shapes: [B, 2] valid (height, width) of each padded image.
        ignore_cross_boundary: the paper ignores anchors that cross the image border in training;
            Detectron and torchvision keep them. Off by default, as in those.
        seed: a keras.random.SeedGenerator owned by the model, so each step samples afresh.
        gt_crowd: optional bool [B, N], the batch's ``iscrowd``. Crowd boxes are not matched
            against; an anchor that is not positive and has more than `crowd_ioa_threshold` of
            its area inside a crowd box is ignored, never sampled as a negative (the rule of
            kerasdet.ops.matching).

    Returns:
        labels int32 [B, A]: 1 positive, 0 negative (both sampled), -1 not used in the loss;
        box_targets [B, A, 4]: encoded deltas towards the matched ground truth.
    """
    anchor_valid = None
    if ignore_cross_boundary:
        anchor_valid = ops.anchors_inside_image_mask(anchors, image_shapes)
    matched, labels, _, _ = ops.label_boxes(
        anchors[tf.newaxis], gt_boxes, gt_labels, positive_iou, negative_iou, 0.0,
        allow_low_quality_matches=allow_low_quality, box_valid=anchor_valid, gt_crowd=gt_crowd,
        crowd_ioa_threshold=crowd_ioa_threshold)
    sampled = ops.sample_balanced(labels, num_samples, positive_fraction, seed=seed)
    labels = tf.where(sampled, labels, -1)
    matched_boxes = ops.gather_by_match(gt_boxes, matched)
    box_targets = ops.encode_boxes(matched_boxes, anchors[tf.newaxis], weights=weights)
    return labels, tf.stop_gradient(box_targets)


def rpn_losses(logits, deltas, labels, box_targets, beta=1.0 / 9.0):
    """Objectness BCE averaged over the sampled anchors and smooth-L1 box loss over the positives
    divided by the same count (see kerasdet.losses for why this matches the paper's weighting)."""
    sampled = tf.cast(labels >= 0, tf.float32)
    positive = tf.cast(labels == 1, tf.float32)
    normalizer = tf.reduce_sum(sampled)
    cls_loss = kd_losses.binary_cross_entropy_loss(positive, logits, sampled, normalizer)
    box_loss = kd_losses.smooth_l1_loss(box_targets, deltas, beta, positive, normalizer)
    return {"rpn_cls": cls_loss, "rpn_box": box_loss}


def generate_proposals(logits, deltas, anchors, image_shapes, pre_nms_top_k, post_nms_top_k,
                       nms_iou=0.7, min_size=0.0, weights=(1.0, 1.0, 1.0, 1.0)):
    """Proposals from RPN outputs: per level top-k, decode, clip, drop small boxes, level-aware NMS,
    then the best `post_nms_top_k` over all levels (the FPN reference implementation's scheme).

    Args:
        logits, deltas: lists per level as returned by RPNHead.
        anchors: list per level of [A_l, 4].
        image_shapes: [B, 2] valid (height, width) used for clipping.

    Returns:
        proposals [B, post_nms_top_k, 4] (stop-gradient: approximate joint training treats them as
        constants), scores [B, post_nms_top_k] (objectness logits) and valid bool [B, post_nms_top_k].
    """
    boxes_all, scores_all, levels_all = [], [], []
    for level, (lvl_logits, lvl_deltas, lvl_anchors) in enumerate(zip(logits, deltas, anchors)):
        k = tf.minimum(pre_nms_top_k, tf.shape(lvl_logits)[1])
        top_scores, top = tf.math.top_k(lvl_logits, k=k)
        top_deltas = tf.gather(lvl_deltas, top, batch_dims=1)
        top_anchors = tf.gather(lvl_anchors, top)
        boxes = ops.decode_boxes(top_deltas, top_anchors, weights=weights)
        boxes = ops.clip_boxes(boxes, image_shapes)
        keep = ops.valid_boxes_mask(boxes, min_size)
        boxes_all.append(boxes)
        scores_all.append(tf.where(keep, top_scores, -1e9))
        levels_all.append(tf.fill(tf.shape(top), level))
    boxes = tf.stop_gradient(tf.concat(boxes_all, axis=1))
    scores = tf.stop_gradient(tf.concat(scores_all, axis=1))
    levels = tf.concat(levels_all, axis=1)
    out = ops.batched_nms_padded(boxes, scores, levels, iou_threshold=nms_iou,
                                 max_output=post_nms_top_k, score_threshold=-1e8)
    # NMS keeps at most the best box per cluster on each level; the top-k over levels then comes
    # from the descending-score order of the padded output.
    valid = out["indices"] >= 0
    return out["boxes"], out["scores"], valid
