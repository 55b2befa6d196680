"""R-CNN (Girshick, Donahue, Darrell & Malik, "Rich feature hierarchies for accurate object detection
and semantic segmentation", CVPR 2014).

    image + ~2000 category-independent proposals (selective search, kerasdet.data.proposals)
      -> every proposal dilated by p = 16 px of context and warped to 227 x 227 (kerasdet.ops.warp)
      -> AlexNet conv1-5 / fc6 / fc7, run once per proposal (kerasdet.backbones.alexnet)
      -> per-class linear SVMs on fc7 (scores), class-specific ridge regression on pool5 (boxes)
      -> greedy per-class NMS at 0.3

Training has three stages, as in the paper:
1. Fine-tuning (Keras `fit`, `compute_detection_losses`): the 1000-way classifier replaced by a
   (K + 1)-way one; proposals (and the ground-truth boxes) with IoU >= 0.5 with a ground truth are
   positives of its class, the rest background; each image contributes `roi_batch_size` warped
   regions, a quarter positives (the paper's 32 positives + 96 background per 128-region batch);
   softmax cross entropy; the recipe's learning rate is a tenth of pre-training's (0.001).
2. Per-class linear SVMs on fc7 with hard negative mining, 3. ridge box regression on pool5
   (both `fit_region_stages`, kerasdet.models.region_stages; settings of kerasdet.heads.region_svms).
`kerasdet train rcnn_...` runs all three; with `fit` alone the model predicts with the fine-tuned
softmax and no box correction.

Test time (`detect`): the proposals are warped and run through the network in chunks of
`crop_batch` regions (a 227 x 227 x 3 float crop is 618 KB: 2000 at once would be 1.2 GB); every
(proposal, class) pair gets its SVM score, greedy per-class NMS at `nms_iou` = 0.3 keeps the best,
and the kept boxes are moved by their class's regressor (the paper's order: score, NMS, regress).
"""
import keras
import numpy as np
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.backbones.alexnet import AlexNet, DEFAULT_INPUT_SIZE
from kerasdet.heads.proposals import ExternalProposals
from kerasdet.heads.roi_sampler import sample_rois
from kerasdet.models.base import Detector, ground_truth, ground_truth_crowd
from kerasdet.models.region_stages import RegionStages
from kerasdet.ops.warp import warp_regions

__all__ = ["RCNN"]

_ALEXNET = {"alexnet": "torchvision", "alexnet_caffe": "caffe", "alexnet_tiny": "tiny"}


@keras.saving.register_keras_serializable(package="kerasdet")
class RCNN(RegionStages, Detector):
    """R-CNN (see the module docstring).

    Args:
        num_classes: K foreground classes.
        backbone: "alexnet" (torchvision layout, converts its checkpoints), "alexnet_caffe" (the
            2012 network the paper used) or "alexnet_tiny" (tests and synthetic entries).
        crop_size: the warped region's side (default: the backbone's, 227 / 64 for tiny).
        context_padding: p, pixels of context at the warped scale (16).
        dropout: on fc6 / fc7 while fine-tuning.
        roi_batch_size, positive_fraction, foreground_iou: fine-tuning regions per image, their
            positive share and the positive IoU (128, 0.25, 0.5).
        nms_iou, score_threshold, max_detections, pre_nms_top_k: test-time output.
        crop_batch: regions warped and run through the network at once at test time.
        svm / ridge: dicts of kerasdet.heads.region_svms.SVMSettings / RidgeSettings fields.
    """

    loss_names = ("cls",)
    predict_input_keys = ("images", "image_info", "proposals")
    proposal_reader = staticmethod(ExternalProposals.read)

    def __init__(self, num_classes, backbone="alexnet", crop_size=None, context_padding=16, dropout=0.5,
                 roi_batch_size=128, positive_fraction=0.25, foreground_iou=0.5, nms_iou=0.3,
                 score_threshold=0.05, max_detections=100, pre_nms_top_k=6000, crop_batch=128,
                 svm=None, ridge=None, input_normalization="default", seed=None, class_names=None,
                 input_settings=None, **kwargs):
        super().__init__(num_classes, class_names=class_names, input_settings=input_settings, **kwargs)
        if backbone not in _ALEXNET:
            raise ValueError(f"RCNN: `backbone` must be one of {sorted(_ALEXNET)}, got {backbone!r}")
        variant = _ALEXNET[backbone]
        crop_size = int(crop_size or DEFAULT_INPUT_SIZE[variant])
        self.settings = dict(
            backbone=backbone, crop_size=crop_size, context_padding=float(context_padding),
            dropout=float(dropout), roi_batch_size=int(roi_batch_size),
            positive_fraction=float(positive_fraction), foreground_iou=float(foreground_iou),
            nms_iou=float(nms_iou), score_threshold=float(score_threshold),
            max_detections=int(max_detections), pre_nms_top_k=int(pre_nms_top_k),
            crop_batch=int(crop_batch), svm=dict(svm or {}), ridge=dict(ridge or {}),
            input_normalization=input_normalization, seed=seed)
        for key, value in self.settings.items():
            setattr(self, key, value)
        # validated here so a typo fails at construction, not after fine-tuning
        from kerasdet.heads.region_svms import RidgeSettings, SVMSettings

        self.svm_settings, self.ridge_settings = SVMSettings(**self.svm), RidgeSettings(**self.ridge)
        # The classifier of the backbone is the (K + 1)-way layer that replaces the 1000-way one.
        self.backbone = AlexNet(variant=variant, include_top=True, num_classes=self.num_classes + 1,
                                dropout=self.dropout, input_shape=(crop_size, crop_size, 3),
                                input_normalization=input_normalization, name=f"alexnet_{variant}")
        self._seed = seed if seed is not None else 0

    # -- regions --------------------------------------------------------------------------------
    def _fill(self):
        value = self.padding_value()
        return tf.constant(value if value is not None else (0.0, 0.0, 0.0), tf.float32)

    def _network(self, images, boxes, indices, training):
        crops = warp_regions(images, boxes, indices, self.crop_size, self.context_padding, self._fill())
        out = self.backbone(tf.cast(crops, self.compute_dtype), training=training)
        pool5 = tf.reshape(out["pool5"], [tf.shape(crops)[0], -1])
        return out["fc7"], pool5, out["logits"]

    def region_features(self, images, rois, valid, image_shapes, training=False):
        """(fc7 [B, R, D], pool5 [B, R, D5], logits [B, R, K + 1]) of every region, computed in
        chunks of `crop_batch` regions (invalid rows are computed on a dummy box and zeroed)."""
        b, r = tf.shape(rois)[0], tf.shape(rois)[1]
        boxes = tf.where(valid[..., None], tf.cast(rois, tf.float32), tf.constant([0.0, 0.0, 1.0, 1.0]))
        flat = tf.reshape(boxes, [-1, 4])
        index = tf.repeat(tf.range(b), r)
        n = b * r
        chunk = self.crop_batch
        chunks = (n + chunk - 1) // chunk
        pad = chunks * chunk - n
        flat = tf.reshape(tf.pad(flat, [[0, pad], [0, 0]], constant_values=1.0), [chunks, chunk, 4])
        index = tf.reshape(tf.pad(index, [[0, pad]]), [chunks, chunk])
        dims = (self.backbone.output["fc7"].shape[-1],
                int(np.prod(self.backbone.output["pool5"].shape[1:])), self.num_classes + 1)
        fc7, pool5, logits = tf.map_fn(
            lambda args: tuple(tf.cast(x, tf.float32) for x in self._network(images, *args, training)),
            (flat, index), parallel_iterations=1,
            fn_output_signature=tuple(tf.TensorSpec([None, d], tf.float32) for d in dims))

        def arrange(x, d):
            x = tf.reshape(x, [-1, d])[:n]
            return tf.where(valid[..., None], tf.reshape(x, [b, r, d]), 0.0)

        return arrange(fc7, dims[0]), arrange(pool5, dims[1]), arrange(logits, dims[2])

    # -- training -------------------------------------------------------------------------------
    def compute_detection_losses(self, batch, training):
        images = self.input_images(batch)
        gt_boxes, gt_labels = ground_truth(batch)
        proposals, valid = self.proposal_reader(batch)
        sampled = sample_rois(proposals, valid, gt_boxes, gt_labels, num_samples=self.roi_batch_size,
                              positive_fraction=self.positive_fraction, foreground_iou=self.foreground_iou,
                              background_iou_low=0.0, seed=self._seed, gt_crowd=ground_truth_crowd(batch))
        rois, labels = sampled["rois"], sampled["labels"]
        b, s = tf.shape(rois)[0], tf.shape(rois)[1]
        used = labels >= 0
        boxes = tf.where(used[..., None], rois, tf.constant([0.0, 0.0, 1.0, 1.0]))
        _, _, logits = self._network(images, tf.reshape(boxes, [-1, 4]), tf.repeat(tf.range(b), s), training)
        logits = tf.reshape(tf.cast(logits, tf.float32), [b, s, self.num_classes + 1])
        return {"cls": kd_losses.softmax_cross_entropy_loss(labels, logits)}

    def region_feature_dims(self):
        return (self.backbone.output["fc7"].shape[-1], int(np.prod(self.backbone.output["pool5"].shape[1:])))

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, **self.settings)
        return config
