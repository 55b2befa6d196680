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

from kerasdet.heads.box_head import BoxPredictor, TwoFCHead
from kerasdet.heads.box_outputs import box_head_losses
from kerasdet.heads.box_stage import BoxStage
from kerasdet.heads.cascade import (CASCADE_BOX_WEIGHTS, CASCADE_IOUS, mean_class_probabilities,
                                    relabel_rois)
from kerasdet.heads.mask_head import MaskConfig
from kerasdet.heads.part_config import part_config
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.mask_rcnn import build_mask_branch

__all__ = ["CascadeRCNN", "CascadeConfig"]

_MODES = ("cascade", "iterative", "integral")


@part_config(attribute="cascade_config")
class CascadeConfig:
    """mode: "cascade", "iterative" (Iterative BBox) or "integral" (integral loss).
    stage_ious: IoU threshold u_t of each stage (the first is the RoI sampler's foreground IoU).
    stage_box_weights: box-coder weights of each stage.
    stage_loss_weights: weight of each stage's (classification + box) loss; Detectron2 uses 1 for
        every stage (Cai's Detectron: 1, 0.5, 0.25).
    gradient_scale: factor on the gradient each stage sends into the trunk through its pooled
        features; None: 1 / number of stages in cascade mode, 1 in the single-head modes.
    stage_add_ground_truth: append the ground-truth boxes to the RoIs of stages t > 1.
    with_masks: add the Cascade Mask R-CNN mask branch (needs `masks` in training batches)."""
    mode: str = "cascade"
    stage_ious: tuple = CASCADE_IOUS
    stage_box_weights: tuple = CASCADE_BOX_WEIGHTS
    stage_loss_weights: tuple = None
    gradient_scale: float = None
    stage_add_ground_truth: bool = True
    with_masks: bool = False

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {self.mode!r}.")
        ious, weights = self.stage_ious, self.stage_box_weights
        if len(ious) < 1:
            raise ValueError("`stage_ious` must name at least one stage.")
        if any(not 0.0 < float(u) <= 1.0 for u in ious):
            raise ValueError(f"`stage_ious` must lie in (0, 1], got {ious}.")
        if len(weights) != len(ious) or any(len(w) != 4 for w in weights):
            raise ValueError(f"`stage_box_weights` must hold 4 weights for each of the "
                             f"{len(ious)} stages, got {weights}.")
        if len(self.loss_weights) != len(ious):
            raise ValueError(f"`stage_loss_weights` must have {len(ious)} entries, got "
                             f"{self.stage_loss_weights}.")

    @property
    def num_stages(self):
        return len(self.stage_ious)

    @property
    def loss_weights(self):
        return tuple(float(w) for w in (self.stage_loss_weights or (1.0,) * self.num_stages))

    @property
    def trunk_gradient_scale(self):
        if self.gradient_scale is not None:
            return float(self.gradient_scale)
        return 1.0 / self.num_stages if self.mode == "cascade" else 1.0

    @property
    def loss_names(self):
        names, stages = ["rpn_cls", "rpn_box"], range(1, self.num_stages + 1)
        if self.mode == "cascade":
            names += [f"stage{t}_{kind}" for t in stages for kind in ("cls", "box")]
        elif self.mode == "iterative":
            names += ["stage1_cls", "stage1_box"]
        else:
            names += [f"stage{t}_cls" for t in stages] + ["stage1_box"]
        return tuple(names) + (("mask",) if self.with_masks else ())


@keras.saving.register_keras_serializable(package="kerasdet")
class CascadeRCNN(FasterRCNN):
    """Cascade R-CNN with an FPN backbone.

    Arguments: FasterRCNN's (fpn, class_agnostic and box_head are fixed to True, True, "2fc"; the
    stages' settings replace box_weights and roi_foreground_iou), CascadeConfig's (mode,
    stage_ious, stage_box_weights, stage_loss_weights, gradient_scale, stage_add_ground_truth,
    with_masks), MaskRCNN's mask settings (mask_*; `max_mask_rois` is the old name of
    `mask_rois_per_image`) and `paste_masks`.
    """

    settings = FasterRCNN.settings + (CascadeConfig, MaskConfig)
    fixed_settings = {"fpn": True, "class_agnostic": True, "box_head": "2fc"}
    excluded_settings = ("box_weights", "roi_foreground_iou")
    renamed_settings = {"max_mask_rois": "mask_rois_per_image"}

    def __init__(self, num_classes, paste_masks=True, **kwargs):
        super().__init__(num_classes, **kwargs)
        # An attribute of its own, as on MaskRCNN: kerasdet.export switches it off while tracing.
        self.paste_masks = bool(paste_masks)

    @property
    def loss_names(self):
        return self.cascade_config.loss_names

    @property
    def mode(self):
        return self.cascade_config.mode

    @property
    def num_stages(self):
        return self.cascade_config.num_stages

    def build_parts(self):
        parts = super().build_parts()
        if self.cascade_config.with_masks:
            parts["mask_branch"] = build_mask_branch(self)
        return parts

    def build_box_stages(self):
        """Stage 1 is FasterRCNN's box head and (class-agnostic) predictor; cascade mode adds a
        head and predictor per later stage, iterative mode applies stage 1 T times, integral mode
        adds a classifier per later IoU."""
        c = self.cascade_config
        first = super().build_box_stages()[0]
        stages, self.integral_classifiers = [first], []
        for t in range(1, c.num_stages):
            if c.mode == "cascade":
                head = TwoFCHead(int(self.faster_rcnn_config.fc_dim), name=f"box_head_stage{t + 1}")
                predictor = BoxPredictor(self.num_classes, class_agnostic=True,
                                         name=f"box_predictor_stage{t + 1}")
                setattr(self, f"box_head_stage{t + 1}", head)
                setattr(self, f"box_predictor_stage{t + 1}", predictor)
                stages.append(BoxStage(self.roi_extractor, predictor, head))
            elif c.mode == "iterative":
                stages.append(first)
            else:
                self.integral_classifiers.append(keras.layers.Dense(
                    self.num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(
                        stddev=0.01), name=f"cls_score_iou{round(c.stage_ious[t] * 100)}"))
        for t, stage in enumerate(dict.fromkeys(stages)):
            stage.box_weights = tuple(float(w) for w in c.stage_box_weights[t])
            stage.foreground_iou = float(c.stage_ious[t])
            stage.loss_weight = c.loss_weights[t]
            stage.gradient_scale = c.trunk_gradient_scale
            stage.loss_prefix = f"stage{t + 1}"
        self.stage_add_ground_truth = bool(c.stage_add_ground_truth)
        return stages

    # -- the stages one by one (tests and benchmarks look inside) -------------------------------
    @property
    def gradient_scale(self):
        return self.box_stages[0].gradient_scale

    @gradient_scale.setter
    def gradient_scale(self, scale):
        for stage in self.trained_stages:
            stage.gradient_scale = float(scale)

    @property
    def stage_heads(self):
        return [stage.head for stage in self.trained_stages]

    @property
    def stage_predictors(self):
        return [stage.predictor for stage in self.trained_stages]

    def pool(self, roi_features, rois):
        """RoI features [B, R, S, S, C] for the stage heads, trunk gradient scaled."""
        return self.box_stages[0].pool(roi_features, rois)

    def stage_head(self, pooled, stage, training=False):
        """(logits, class-agnostic deltas) of stage `stage` (0-based)."""
        return self.box_stages[stage].predict(pooled, training)

    def stage_weights(self, stage):
        return self.box_stages[stage].box_weights

    def cascade_losses(self, *args, **kwargs):
        return self.box_losses(*args, **kwargs)

    # -- the integral loss: one head, a classifier per IoU ----------------------------------------
    def _integral_logits(self, pooled, training=False):
        hidden = self.box_head(pooled, training=training)
        logits, deltas = self.box_predictor(hidden, training=training)
        return [logits] + [cls(hidden, training=training) for cls in self.integral_classifiers], deltas

    def integral_losses(self, roi_features, sampled, gt_boxes, gt_labels, gt_crowd=None,
                        training=False):
        """Each classifier on the sampled RoIs labelled at its threshold, the regressor at the
        first; returns the losses and the RoIs labelled at the last threshold."""
        c, losses = self.cascade_config, {}
        stage_logits, deltas = self._integral_logits(self.pool(roi_features, sampled["rois"]),
                                                     training)
        targets = sampled
        for t, logits in enumerate(stage_logits):
            if t > 0:  # the same RoIs, labelled at the higher threshold
                targets = relabel_rois(sampled["rois"], sampled["labels"] >= 0, gt_boxes,
                                       gt_labels, c.stage_ious[t], add_ground_truth=False,
                                       gt_crowd=gt_crowd)
            cls, box = box_head_losses(logits, deltas, targets, weights=self.stage_weights(0))
            losses[f"stage{t + 1}_cls"] = c.loss_weights[t] * cls
            if t == 0:
                losses["stage1_box"] = c.loss_weights[0] * box
        return losses, targets

    def box_losses(self, roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                   gt_crowd=None, training=False):
        if self.cascade_config.mode == "integral":
            return self.integral_losses(roi_features, sampled, gt_boxes, gt_labels, gt_crowd,
                                        training)
        return super().box_losses(roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                                  gt_crowd, training)

    def refine(self, roi_features, proposals, image_shapes, training=False):
        if self.cascade_config.mode == "integral":
            stage_logits, deltas = self._integral_logits(self.pool(roi_features, proposals),
                                                         training)
            return (mean_class_probabilities(stage_logits), deltas, proposals,
                    self.stage_weights(0))
        return super().refine(roi_features, proposals, image_shapes, training)

    def get_config(self):
        return dict(super().get_config(), paste_masks=self.paste_masks)
