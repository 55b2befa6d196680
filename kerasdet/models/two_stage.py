"""Region-based detectors assembled from parts.

    images -> features() ---------------------------------+---------------------------+
              (backbone [+ neck])                         | RoI feature maps          |
                 | proposal maps                          v                           v
                 v                        box stage 1 -> box stage 2 -> ... -> [mask branch]
         proposal source  --proposals-->  (extractor + head + predictor; each stage refines
         (RPN, or external)  (+ RPN losses)  the boxes the next one pools; the last stage's
                                             labelled RoIs train the mask branch)

A detector class states its settings (part configs, kerasdet.heads.part_config), builds its layers
as attributes (their names are the weight paths and the converters' key maps) and injects the
parts into `assemble`: a proposal source (kerasdet.heads.rpn.RPN, heads.proposals.
ExternalProposals), a list of `BoxStage`s and an optional `MaskBranch`. Training and inference are
written once here, for one stage as for a cascade:

  training: sample RoIs (the first stage's IoU) -> each distinct stage in turn: pool, predict,
            loss; the next stage gets the regressed boxes relabelled at its own IoU;
  test:     every stage in the list refines the boxes of the previous one; the distinct stages'
            class probabilities on the last boxes are averaged (one stage: its softmax), and the
            last stage's deltas give the boxes.

A stage listed several times is one set of weights applied several times (Iterative BBox).
"""
import warnings

import keras
import tensorflow as tf

from kerasdet.heads.cascade import mean_class_probabilities, relabel_rois
from kerasdet.heads.mask_head import batch_mask_grids
from kerasdet.heads.part_config import flat_settings, read_settings
from kerasdet.models.base import Detector, batch_image_shapes, ground_truth, ground_truth_crowd

__all__ = ["TwoStageDetector"]


class TwoStageDetector(Detector):
    """Base of the region-based detectors.

    Subclasses set `settings` (part config classes: their prefixed fields are the flat constructor
    arguments and the `get_config` entries), optionally `setting_defaults` (their own defaults),
    `fixed_settings` (values they impose), `excluded_settings` (arguments that do not apply) and
    `renamed_settings` (old name -> new name, accepted with a DeprecationWarning); and implement
    `build_parts()` (create the layers, return the parts for `assemble`) and
    `features(images, training)` -> (proposal maps, RoI feature maps).
    """

    settings = ()
    setting_defaults = {}
    fixed_settings = {}
    excluded_settings = ()
    renamed_settings = {}
    # Cascade stages t > 1 add the ground-truth boxes to their RoIs (kerasdet.heads.cascade).
    stage_add_ground_truth = True

    def __init__(self, num_classes, seed=None, **kwargs):
        owner = type(self).__name__
        for old, new in self.renamed_settings.items():
            if old in kwargs:
                if new in kwargs:
                    raise ValueError(f"{owner}: give `{new}` only (`{old}` is its old name).")
                warnings.warn(f"{owner}: `{old}` is deprecated, use `{new}`.", DeprecationWarning,
                              stacklevel=2)
                kwargs[new] = kwargs.pop(old)
        configs = read_settings(self.settings, kwargs, self.setting_defaults,
                                self.fixed_settings, self.excluded_settings, owner)
        # Set before Detector.__init__, which reads `loss_names` (a cascade's depend on them).
        self._setting_attributes = tuple(cls.attribute for cls in configs)
        for cls, config in configs.items():
            setattr(self, cls.attribute, config)
        super().__init__(num_classes, **kwargs)
        self.seed = seed
        self.sampling_seed = keras.random.SeedGenerator(seed, name="sampling_seed")
        self.assemble(**self.build_parts())

    # -- assembly -------------------------------------------------------------------------------
    def build_parts(self):
        raise NotImplementedError

    def assemble(self, proposal_source, box_stages, mask_branch=None):
        """Injects the parts (their layers are already attributes of the detector)."""
        if not box_stages:
            raise ValueError("A two-stage detector needs at least one box stage.")
        self.proposal_source = proposal_source
        self.box_stages = tuple(box_stages)
        self.mask_branch = mask_branch

    def features(self, images, training=False):
        raise NotImplementedError

    @property
    def trained_stages(self):
        """The distinct box stages, in order (each has its own weights and loss)."""
        return tuple(dict.fromkeys(self.box_stages))

    @property
    def predict_input_keys(self):
        return Detector.predict_input_keys + tuple(self.proposal_source.input_keys)

    # -- training -------------------------------------------------------------------------------
    def first_stage(self, batch, training):
        """Everything up to the proposals in training: a context dict with `batch`, `images`,
        `image_shapes`, `gt_boxes`, `gt_labels` (padded, label -1), `gt_crowd` (the ``iscrowd``
        flags the samplers ignore regions by), `roi_features`, `proposals`, `proposal_valid`, and
        `losses` holding the proposal source's losses."""
        images = tf.cast(batch["images"], self.compute_dtype)
        gt_boxes, gt_labels = ground_truth(batch)
        context = dict(batch=batch, images=images, image_shapes=batch_image_shapes(batch, images),
                       gt_boxes=gt_boxes, gt_labels=gt_labels, gt_crowd=ground_truth_crowd(batch))
        proposal_maps, roi_features = self.features(images, training=training)
        proposals, valid, losses = self.proposal_source.with_losses(
            proposal_maps, context, self.sampling_seed, training)
        context.update(roi_features=roi_features, proposals=proposals, proposal_valid=valid,
                       losses=dict(losses))
        return context

    def sample_training_rois(self, context, foreground_iou=None):
        """The first stage's training RoIs (`RoIConfig.sample` on the context's proposals,
        foreground at the first stage's IoU); with `roi_ohem`, the first stage's hardest
        `roi_batch_size` of all the labelled proposals (`BoxStage.hard_examples`)."""
        r, stage = self.roi_config, self.box_stages[0]
        iou = foreground_iou or stage.foreground_iou
        if r.ohem:
            labelled = r.label(context["proposals"], context["proposal_valid"],
                               context["gt_boxes"], context["gt_labels"],
                               context.get("gt_crowd"), iou)
            return stage.hard_examples(context["roi_features"], labelled, r.batch_size,
                                       r.ohem_nms_iou)
        return r.sample(context["proposals"], context["proposal_valid"], context["gt_boxes"],
                        context["gt_labels"], self.sampling_seed, context.get("gt_crowd"), iou)

    def stage_targets(self, roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                      gt_crowd=None, training=False):
        """Runs the training stages: per distinct stage (targets, logits, deltas); stage t's
        targets are stage t - 1's regressed boxes relabelled at its own IoU."""
        outputs = []
        stages = self.trained_stages
        for t, stage in enumerate(stages):
            targets = sampled
            if t > 0:
                previous, _, deltas = outputs[-1]
                boxes, nonempty = stages[t - 1].refine(deltas, previous["rois"], image_shapes)
                targets = relabel_rois(boxes, (previous["labels"] >= 0) & nonempty, gt_boxes,
                                       gt_labels, stage.foreground_iou,
                                       add_ground_truth=self.stage_add_ground_truth,
                                       gt_crowd=gt_crowd)
            logits, deltas = stage(roi_features, targets["rois"], training)
            outputs.append((targets, logits, deltas))
        return outputs

    def box_losses(self, roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                   gt_crowd=None, training=False):
        """Every stage's losses, and the last stage's labelled RoIs (what the mask branch reads)."""
        losses = {}
        outputs = self.stage_targets(roi_features, sampled, gt_boxes, gt_labels, image_shapes,
                                     gt_crowd, training)
        for stage, (targets, logits, deltas) in zip(self.trained_stages, outputs):
            losses.update(stage.losses(logits, deltas, targets))
        return losses, outputs[-1][0]

    def second_stage_losses(self, context, training):
        """Losses of everything after the proposals."""
        sampled = self.sample_training_rois(context)
        context["sampled"] = sampled
        losses, last = self.box_losses(context["roi_features"], sampled, context["gt_boxes"],
                                       context["gt_labels"], context["image_shapes"],
                                       context.get("gt_crowd"), training)
        if self.mask_branch is not None:
            losses["mask"] = self.mask_loss(context["roi_features"], last,
                                            *batch_mask_grids(context["batch"]), training=training)
        return losses

    def compute_detection_losses(self, batch, training):
        context = self.first_stage(batch, training)
        losses = context["losses"]
        losses.update(self.second_stage_losses(context, training))
        return losses

    # -- inference ------------------------------------------------------------------------------
    def first_stage_inference(self, images, image_shapes, training=False, inputs=None):
        """(roi_features, proposals, proposal_valid) at test time."""
        proposal_maps, roi_features = self.features(images, training=training)
        proposals, valid = self.proposal_source.inference(proposal_maps, inputs, image_shapes)
        return roi_features, proposals, valid

    def refine(self, roi_features, proposals, image_shapes, training=False):
        """The stages on [B, P, 4] proposals at test time: (class probabilities [B, P, K + 1],
        the last stage's deltas, the boxes they apply to, and its box-coder weights)."""
        rois = proposals
        for stage in self.box_stages[:-1]:
            _, deltas = stage(roi_features, rois, training)
            rois, _ = stage.refine(deltas, rois, image_shapes)
        pooled, outputs = {}, []
        for stage in self.trained_stages:  # stages sharing an extractor pool once
            key = id(stage.extractor)
            if key not in pooled:
                pooled[key] = stage.pool(roi_features, rois)
            outputs.append(stage.predict(pooled[key], training))
        probs = mean_class_probabilities([logits for logits, _ in outputs])
        return probs, outputs[-1][1], rois, self.box_stages[-1].box_weights

    def detect_boxes(self, roi_features, proposals, valid, image_shapes, training=False):
        """The box stages on the proposals, decoded and NMSed: the predict dict."""
        probs, deltas, rois, weights = self.refine(roi_features, proposals, image_shapes,
                                                   training)
        return self.output_config.detections(probs, deltas, rois, valid, image_shapes, weights)

    def detect(self, images, image_shapes, training=False, inputs=None):
        roi_features, proposals, valid = self.first_stage_inference(images, image_shapes,
                                                                    training, inputs)
        outputs = self.detect_boxes(roi_features, proposals, valid, image_shapes, training)
        if self.mask_branch is not None:
            outputs["masks"] = self.mask_branch.masks(roi_features, outputs,
                                                      tf.shape(images)[1:3], self.paste_masks)
        return outputs

    def call(self, inputs, training=False):
        images = self.input_images(inputs)
        return self.detect(images, batch_image_shapes(inputs, images), training=training,
                           inputs=inputs)

    def build(self, input_shape=None):
        example = getattr(self.proposal_source, "example_inputs", None)
        if self.built or example is None:
            return super().build(input_shape)
        self.call(example(tf.zeros([1, 64, 64, 3], self.compute_dtype)))
        self.built = True

    # -- mask branch ----------------------------------------------------------------------------
    def mask_logits(self, roi_features, boxes, training=False):
        """[B, R, 4] boxes -> per-class mask logits [B, R, 2S, 2S, K] (float32)."""
        return self.mask_branch.logits(roi_features, boxes, training)

    def mask_loss(self, roi_features, targets, gt_masks, gt_boxes, training=False):
        """The mask loss on the foreground of labelled RoIs (see `MaskBranch.loss`)."""
        return self.mask_branch.loss(roi_features, targets, gt_masks, gt_boxes, training)

    def detection_masks(self, roi_features, detections, canvas_size):
        return self.mask_branch.masks(roi_features, detections, canvas_size, self.paste_masks)

    # -- config ---------------------------------------------------------------------------------
    @property
    def part_configs(self):
        return tuple(getattr(self, name) for name in self._setting_attributes)

    def get_config(self):
        config = super().get_config()
        config.update(flat_settings(self.part_configs,
                                    skip=set(self.fixed_settings) | set(self.excluded_settings)))
        config["seed"] = self.seed
        return config
