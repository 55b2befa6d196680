"""Cascade R-CNN (Cai & Vasconcelos 2018) on the FPN Faster R-CNN, with the paper's Iterative BBox
and integral-loss baselines as modes of the same parts.

mode="cascade": T = 3 stages, each its own 2fc head and class-agnostic predictor, trained at IoU
    0.5 / 0.6 / 0.7 with box-coder weights (10,10,5,5) / (20,20,10,10) / (30,30,15,15). Stage 1 is
    trained on the usual RoI sample (512 per image, 25 % foreground, ground truth added); stage
    t > 1 on stage t - 1's regressed boxes (gradient stopped), relabeled at u_t with the ground
    truth appended again and no resampling (Detectron2's CascadeROIHeads; see
    kerasdet.heads.cascade).
    Each stage's pooled features pass through a gradient-scaling identity (x 1/T) so the trunk gets
    the mean of the stages' gradients (Detectron2). Test: proposals -> stage 1 -> stage 2 -> stage
    3; the score is the mean of the three classifiers' probabilities, all evaluated on the last
    stage's input boxes (the paper's / Detectron's ensemble), the boxes are the last stage's.
mode="iterative": one head trained at IoU 0.5 (a Faster R-CNN head with class-agnostic boxes),
    applied T times at test time (f o f o f); score from its last application.
mode="integral": one head, one regressor trained at 0.5, and T classifiers trained on the same
    RoIs labeled at 0.5 / 0.6 / 0.7 (the integral loss); score = the mean of the classifiers.
with_masks=True (Cascade Mask R-CNN): Mask R-CNN's mask branch (kerasdet.heads.mask_head) on the
    last stage: trained on the last stage's foreground RoIs (its input boxes, IoU >= u_T with their
    ground truth; the "mask branch at the last stage" variant of the journal version of the paper),
    applied at test time to the final detections. Detectron2 instead trains its single mask head on
    the first stage's sample.
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.heads.box_head import BoxPredictor, TwoFCHead
from kerasdet.heads.box_outputs import box_head_losses, decode_detections
from kerasdet.heads.cascade import (CASCADE_BOX_WEIGHTS, CASCADE_IOUS, mean_class_probabilities,
                                    refine_boxes, relabel_rois, scale_gradient)
from kerasdet.heads.mask_head import MaskHead, checked_mask_grids, mask_targets
from kerasdet.heads.mask_head import detection_masks as masks_of_detections
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.models.faster_rcnn import FasterRCNN

__all__ = ["CascadeRCNN"]

_MODES = ("cascade", "iterative", "integral")
# FasterRCNN arguments a cascade fixes itself (they come back from FasterRCNN.get_config).
_FIXED = {"fpn": True, "class_agnostic": True, "box_head": "2fc"}


def _loss_names(mode, num_stages, with_masks):
    names = ["rpn_cls", "rpn_box"]
    if mode == "cascade":
        for t in range(1, num_stages + 1):
            names += [f"stage{t}_cls", f"stage{t}_box"]
    elif mode == "iterative":
        names += ["stage1_cls", "stage1_box"]
    else:
        names += [f"stage{t}_cls" for t in range(1, num_stages + 1)] + ["stage1_box"]
    if with_masks:
        names.append("mask")
    return tuple(names)


def _class_agnostic(deltas):
    # BoxPredictor's reshape leaves the box axis unknown inside tf.function; the shared losses and
    # decoding recognise class-agnostic deltas by a static size of 1 there.
    return tf.ensure_shape(deltas, [None, None, 1, 4])


def _batch_masks(batch):
    """(grids [B, N, G, G], boxes [B, N, 4]) of the batch (see MaskRCNN._gt_masks)."""
    masks = batch.get("masks")
    if masks is None:
        masks = batch["bounding_boxes"].get("masks")
    if masks is None:
        raise ValueError("CascadeRCNN(with_masks=True) needs instance masks in the batch: `masks` "
                         "[B, N, G, G] grids over the boxes (build_dataset(..., with_masks=True)).")
    return checked_mask_grids(masks, batch["bounding_boxes"]["boxes"])


@keras.saving.register_keras_serializable(package="kerasdet")
class CascadeRCNN(FasterRCNN):
    """Cascade R-CNN with an FPN backbone.

    Args:
        num_classes: number of object classes K (background is added internally).
        mode: "cascade" (default), "iterative" (Iterative BBox) or "integral" (integral loss).
        stage_ious: IoU threshold u_t of each stage (the first also sets the RoI sampler's
            foreground threshold).
        stage_box_weights: box-coder weights of each stage.
        stage_loss_weights: weight of each stage's (classification + box) loss; Detectron2 uses
            1 for every stage (Cai's Detectron: 1, 0.5, 0.25).
        gradient_scale: factor on the gradient each stage sends into the trunk through its pooled
            features; default 1 / number of stages in cascade mode, 1 in the single-head modes.
        stage_add_ground_truth: append the ground-truth boxes to the RoIs of stages t > 1.
        with_masks: add the Cascade Mask R-CNN mask branch (needs `masks` in training batches;
            predict then returns `masks` as MaskRCNN does).
        mask_pool_size / mask_sampling_ratio / mask_channels / mask_num_convs / mask_threshold /
            paste_masks / max_mask_rois: the mask branch's settings (see MaskRCNN); max_mask_rois
            bounds the foreground RoIs per image the mask loss uses (default: the RoI sample's
            foreground quota).
        **kwargs: FasterRCNN's arguments (backbone, anchors, RPN, RoI sampling, post-processing);
            fpn, class_agnostic and box_head are fixed (True, True, "2fc").
    """

    def __init__(self, num_classes, mode="cascade", stage_ious=CASCADE_IOUS,
                 stage_box_weights=CASCADE_BOX_WEIGHTS, stage_loss_weights=None,
                 gradient_scale=None, stage_add_ground_truth=True, with_masks=False,
                 mask_pool_size=14, mask_sampling_ratio=0, mask_channels=256, mask_num_convs=4,
                 mask_threshold=0.5, paste_masks=True, max_mask_rois=None, **kwargs):
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
        stage_ious = tuple(float(u) for u in stage_ious)
        stage_box_weights = tuple(tuple(float(w) for w in ws) for ws in stage_box_weights)
        num_stages = len(stage_ious)
        if num_stages < 1:
            raise ValueError("`stage_ious` must name at least one stage.")
        if any(not 0.0 < u <= 1.0 for u in stage_ious):
            raise ValueError(f"`stage_ious` must lie in (0, 1], got {stage_ious}.")
        if len(stage_box_weights) != num_stages or any(len(w) != 4 for w in stage_box_weights):
            raise ValueError(f"`stage_box_weights` must hold 4 weights for each of the {num_stages}"
                             f" stages, got {stage_box_weights}.")
        stage_loss_weights = tuple(float(w) for w in (stage_loss_weights or (1.0,) * num_stages))
        if len(stage_loss_weights) != num_stages:
            raise ValueError(f"`stage_loss_weights` must have {num_stages} entries, got "
                             f"{stage_loss_weights}.")
        for key, value in _FIXED.items():
            if key in kwargs and kwargs.pop(key) != value:
                raise ValueError(f"CascadeRCNN fixes `{key}={value!r}`; do not pass another value.")
        box_weights = kwargs.pop("box_weights", None)  # set per stage by stage_box_weights
        if box_weights is not None and tuple(float(w) for w in box_weights) != \
                stage_box_weights[0]:
            raise ValueError(f"`box_weights` ({box_weights}) must equal stage_box_weights[0] "
                             f"({stage_box_weights[0]}); give the stages' weights instead.")
        iou = kwargs.pop("roi_foreground_iou", stage_ious[0])
        if abs(float(iou) - stage_ious[0]) > 1e-9:
            raise ValueError(f"`roi_foreground_iou` ({iou}) must equal stage_ious[0] "
                             f"({stage_ious[0]}): the first stage's threshold.")
        # Read by Detector.__init__ (through loss_names) to create the loss trackers.
        self.mode = mode
        self.num_stages = num_stages
        self.with_masks = bool(with_masks)
        super().__init__(num_classes, roi_foreground_iou=stage_ious[0],
                         box_weights=stage_box_weights[0], **_FIXED, **kwargs)
        self.stage_ious = stage_ious
        self.stage_box_weights = stage_box_weights
        self.stage_loss_weights = stage_loss_weights
        self.stage_add_ground_truth = bool(stage_add_ground_truth)
        if gradient_scale is None:
            gradient_scale = 1.0 / num_stages if mode == "cascade" else 1.0
        self.gradient_scale = float(gradient_scale)

        # Stage 1 is FasterRCNN's own box_head / box_predictor (class-agnostic here).
        self.stage_heads = [self.box_head]
        self.stage_predictors = [self.box_predictor]
        self.integral_classifiers = []
        if mode == "cascade":
            for t in range(2, num_stages + 1):
                self.stage_heads.append(TwoFCHead(self.fc_dim, name=f"box_head_stage{t}"))
                self.stage_predictors.append(BoxPredictor(num_classes, class_agnostic=True,
                                                          name=f"box_predictor_stage{t}"))
        elif mode == "integral":
            for t in range(2, num_stages + 1):
                self.integral_classifiers.append(keras.layers.Dense(
                    num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(
                        stddev=0.01), name=f"cls_score_iou{round(stage_ious[t - 1] * 100)}"))

        self.mask_settings = dict(
            mask_pool_size=int(mask_pool_size), mask_sampling_ratio=int(mask_sampling_ratio),
            mask_channels=int(mask_channels), mask_num_convs=int(mask_num_convs),
            mask_threshold=float(mask_threshold),
            max_mask_rois=int(max_mask_rois or max(1, round(
                self.roi_settings["batch_size"] * self.roi_settings["positive_fraction"]))))
        # An attribute of its own, as on MaskRCNN: kerasdet.export switches it off while tracing.
        self.paste_masks = bool(paste_masks)
        if not 0.0 < self.mask_settings["mask_threshold"] < 1.0:
            raise ValueError(f"`mask_threshold` must be in (0, 1), got {mask_threshold!r}.")
        if self.with_masks:
            self.mask_roi_extractor = RoIExtractor(
                int(mask_pool_size), strides=self.roi_extractor.strides, method="roi_align",
                sampling_ratio=int(mask_sampling_ratio), aligned=self.roi_aligned, name="mask_roi_extractor")
            self.mask_head = MaskHead(num_classes, channels=int(mask_channels),
                                      num_convs=int(mask_num_convs), name="mask_head")

    @property
    def loss_names(self):
        return _loss_names(self.mode, self.num_stages, self.with_masks)

    # -- stage building blocks ------------------------------------------------------------------
    def pool(self, roi_features, rois):
        """RoI features [B, R, S, S, C] for the stage heads; the gradient into the trunk is scaled
        by `gradient_scale` (every stage pools separately, so the trunk gets their mean)."""
        pooled = self.roi_extractor(roi_features, rois)
        if self.gradient_scale != 1.0:
            pooled = scale_gradient(pooled, self.gradient_scale)
        return pooled

    def stage_head(self, pooled, stage):
        """(logits [B, R, K + 1], class-agnostic deltas [B, R, 1, 4]) of stage `stage` (0-based;
        in iterative mode every stage is the one head)."""
        index = stage if self.mode == "cascade" else 0
        hidden = self.stage_heads[index](pooled)
        logits, deltas = self.stage_predictors[index](hidden)
        return logits, _class_agnostic(deltas)

    def stage_weights(self, stage):
        """Box-coder weights of `stage` (0-based); the single-head modes use the first stage's."""
        return self.stage_box_weights[stage if self.mode == "cascade" else 0]

    def _integral_logits(self, pooled):
        hidden = self.box_head(pooled)
        logits, deltas = self.box_predictor(hidden)
        return [logits] + [cls(hidden) for cls in self.integral_classifiers], \
            _class_agnostic(deltas)

    # -- Detector interface ---------------------------------------------------------------------
    def second_stage_losses(self, context, training):
        # FasterRCNN.first_stage gives the RPN losses and proposals; the cascade replaces the box
        # branch that follows.
        sampled = self.sample_training_rois(context, foreground_iou=self.stage_ious[0])
        args = (context["roi_features"], sampled, context["gt_boxes"], context["gt_labels"])
        crowd = context.get("gt_crowd")
        if self.mode == "integral":
            losses, last_targets = self.integral_losses(*args, gt_crowd=crowd)
        else:
            losses, last_targets = self.cascade_losses(*args, context["image_shapes"],
                                                       gt_crowd=crowd)
        if self.with_masks:
            losses["mask"] = self.mask_loss(context["roi_features"], last_targets,
                                            *_batch_masks(context["batch"]))
        return losses

    def stage_targets(self, roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                      gt_crowd=None):
        """Runs the training cascade: a list with, per stage, (targets dict, logits, deltas);
        stage t's targets are stage t - 1's refined boxes relabeled at u_t."""
        num = self.num_stages if self.mode == "cascade" else 1
        targets = sampled
        outputs = []
        for t in range(num):
            if t > 0:
                prev_targets, _, prev_deltas = outputs[-1]
                boxes, nonempty = refine_boxes(prev_deltas, prev_targets["rois"], image_shapes,
                                               self.stage_weights(t - 1))
                targets = relabel_rois(boxes, (prev_targets["labels"] >= 0) & nonempty,
                                       gt_boxes, gt_labels, self.stage_ious[t],
                                       add_ground_truth=self.stage_add_ground_truth,
                                       gt_crowd=gt_crowd)
            logits, deltas = self.stage_head(self.pool(roi_features, targets["rois"]), t)
            outputs.append((targets, logits, deltas))
        return outputs

    def cascade_losses(self, roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                       gt_crowd=None):
        """Per-stage (weighted) losses of the cascade / iterative modes, and the last stage's
        labeled RoIs (for the mask branch)."""
        losses = {}
        stages = self.stage_targets(roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                                    gt_crowd)
        for t, (targets, logits, deltas) in enumerate(stages):
            cls, box = box_head_losses(logits, deltas, targets, weights=self.stage_weights(t))
            weight = self.stage_loss_weights[t]
            losses[f"stage{t + 1}_cls"] = weight * cls
            losses[f"stage{t + 1}_box"] = weight * box
        return losses, stages[-1][0]

    def integral_losses(self, roi_features, sampled, gt_boxes, gt_labels, gt_crowd=None):
        """The integral loss: each classifier on the sampled RoIs labeled at its threshold, the
        regressor at the first; returns the losses and the RoIs labeled at the last threshold."""
        losses = {}
        stage_logits, deltas = self._integral_logits(self.pool(roi_features, sampled["rois"]))
        for t, logits in enumerate(stage_logits):
            if t == 0:
                targets = sampled
            else:  # the same RoIs, labeled at the higher threshold
                targets = relabel_rois(sampled["rois"], sampled["labels"] >= 0, gt_boxes,
                                       gt_labels, self.stage_ious[t], add_ground_truth=False,
                                       gt_crowd=gt_crowd)
            cls, box = box_head_losses(logits, deltas, targets, weights=self.stage_weights(0))
            losses[f"stage{t + 1}_cls"] = self.stage_loss_weights[t] * cls
            if t == 0:
                losses["stage1_box"] = self.stage_loss_weights[0] * box
        return losses, targets

    # -- mask branch (Cascade Mask R-CNN) -------------------------------------------------------
    def mask_logits(self, roi_features, boxes):
        """[B, R, 4] boxes -> per-class mask logits [B, R, 2S, 2S, K] (float32)."""
        pooled = self.mask_roi_extractor(roi_features, boxes)
        return tf.cast(self.mask_head(pooled), tf.float32)

    def mask_loss(self, roi_features, targets, gt_masks, gt_boxes):
        """Mask R-CNN's loss on the foreground RoIs of `targets` (the last stage's labeled RoIs);
        at most `max_mask_rois` per image, foreground moved to the front first. `gt_masks`
        [B, N, G, G] are grids covering `gt_boxes` [B, N, 4]."""
        k = self.mask_settings["max_mask_rois"]
        labels = targets["labels"]
        k = min(k, labels.shape[1]) if labels.shape[1] is not None else k
        # Stable sort on "is foreground" keeps the RoI order among the foreground.
        order = tf.argsort(tf.cast(labels > 0, tf.int32), axis=1, direction="DESCENDING",
                           stable=True)[:, :k]
        labels = tf.gather(labels, order, batch_dims=1)
        rois = tf.gather(targets["rois"], order, batch_dims=1)
        matched = tf.gather(targets["matched_index"], order, batch_dims=1)
        mask_size = 2 * self.mask_settings["mask_pool_size"]
        mask_targets_ = mask_targets(gt_masks, gt_boxes, rois, matched, mask_size,
                                     threshold=self.mask_settings["mask_threshold"])
        logits = self.mask_logits(roi_features, rois)
        return kd_losses.mask_loss(mask_targets_, logits, tf.maximum(labels - 1, 0),
                                   weights=tf.cast(labels > 0, tf.float32))

    def detection_masks(self, roi_features, detections, canvas_size):
        """Masks of the final detections (see kerasdet.heads.mask_head.detection_masks)."""
        logits = self.mask_logits(roi_features, tf.stop_gradient(detections["boxes"]))
        return masks_of_detections(logits, detections, canvas_size,
                                   self.mask_settings["mask_threshold"], self.paste_masks)

    def refine(self, roi_features, proposals, image_shapes):
        """Test-time cascade on [B, P, 4] proposals.

        Returns (class probabilities [B, P, K + 1] (the stage ensemble), final deltas
        [B, P, 1, 4], the boxes those deltas apply to [B, P, 4], and the box-coder weights to
        decode them with).
        """
        if self.mode == "integral":
            stage_logits, deltas = self._integral_logits(self.pool(roi_features, proposals))
            return (mean_class_probabilities(stage_logits), deltas, proposals,
                    self.stage_weights(0))
        rois = proposals
        for t in range(self.num_stages - 1):
            _, deltas = self.stage_head(self.pool(roi_features, rois), t)
            rois, _ = refine_boxes(deltas, rois, image_shapes, self.stage_weights(t))
        pooled = self.pool(roi_features, rois)
        last = self.num_stages - 1
        if self.mode == "iterative":  # one head: the "ensemble" is its own last output
            logits, deltas = self.stage_head(pooled, last)
            return mean_class_probabilities([logits]), deltas, rois, self.stage_weights(last)
        outputs = [self.stage_head(pooled, t) for t in range(self.num_stages)]
        probs = mean_class_probabilities([logits for logits, _ in outputs])
        return probs, outputs[-1][1], rois, self.stage_weights(last)

    def detect(self, images, image_shapes, training=False):
        roi_features, proposals, valid = self.first_stage_inference(images, image_shapes,
                                                                    training)
        probs, box_deltas, rois, weights = self.refine(roi_features, proposals, image_shapes)
        outputs = decode_detections(
            probs, tf.cast(box_deltas, tf.float32), rois, valid, image_shapes, weights=weights,
            score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_detections=self.max_detections)
        if self.with_masks:
            outputs["masks"] = self.detection_masks(roi_features, outputs, tf.shape(images)[1:3])
        return outputs

    def get_config(self):
        config = super().get_config()
        for key in ("fpn", "class_agnostic", "box_head", "box_weights", "roi_foreground_iou"):
            config.pop(key, None)
        config.update(
            mode=self.mode, stage_ious=list(self.stage_ious),
            stage_box_weights=[list(w) for w in self.stage_box_weights],
            stage_loss_weights=list(self.stage_loss_weights), gradient_scale=self.gradient_scale,
            stage_add_ground_truth=self.stage_add_ground_truth, with_masks=self.with_masks,
            paste_masks=self.paste_masks, **self.mask_settings)
        return config
