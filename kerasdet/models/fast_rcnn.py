"""Fast R-CNN (Girshick 2015): a detector on external region proposals.

One forward pass of the backbone per image, RoI max pooling (section 2.1) of every proposal from
the last conv map, fc layers, and the two sibling outputs (K + 1 softmax scores, per-class box
deltas) trained with the multi-task loss (eq. 1). Hierarchical sampling (section 2.3): each batch
holds N images and R RoIs in all (N = 2, R = 128: 64 per image), a quarter foreground with
IoU >= 0.5, the rest background with IoU in [0.1, 0.5).

The proposals (selective search in the paper) travel in the batch as `proposals` [B, P, 4]; rows
with zero area are padding. `jittered_proposals` makes a stand-in for data sets that have none.
"""
import keras
import tensorflow as tf

from kerasdet import backbones as kd_backbones
from kerasdet import ops
from kerasdet.heads.box_head import BoxPredictor, TwoFCHead, truncated_svd_compress
from kerasdet.heads.box_outputs import box_head_losses, decode_detections
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.heads.roi_sampler import sample_rois
from kerasdet.models.base import Detector, batch_image_shapes, ground_truth, ground_truth_crowd

__all__ = ["FastRCNN", "jittered_proposals"]


def _proposals_of(inputs):
    if not isinstance(inputs, dict) or "proposals" not in inputs:
        raise ValueError("FastRCNN works on external proposals: give it a dict with `images` and "
                         "`proposals` [B, P, 4] (zero-area rows are padding).")
    proposals = tf.cast(inputs["proposals"], tf.float32)
    return proposals, ops.valid_boxes_mask(proposals)


@keras.saving.register_keras_serializable(package="kerasdet")
class FastRCNN(Detector):
    """Fast R-CNN on a single feature map.

    Args:
        num_classes: K object classes.
        backbone / backbone_config: registered backbone and its kwargs ("vgg16" is the paper's).
        feature: the backbone output to pool from ("conv5_3" for VGG-16, "C4" for ResNet/tiny).
        fc_dim / num_fcs / svd_ranks: the fc6/fc7 head (4096 in the paper) and its optional
            truncated-SVD factorization (section 3.1).
        roi_pooling: "roi_pool" (the paper) or "roi_align"; roi_output_size 7 (VGG-16's pool5 grid).
        rois_per_image / roi_positive_fraction / roi_background_iou_low: hierarchical sampling.
        nms_iou: per-class NMS at test time (0.3 in the paper's code).
    """

    loss_names = ("roi_cls", "roi_box")
    predict_input_keys = ("images", "image_info", "proposals")

    def __init__(self, num_classes, backbone="vgg16", backbone_config=None, feature="conv5_3",
                 fc_dim=4096, num_fcs=2, svd_ranks=None, roi_pooling="roi_pool",
                 roi_output_size=7, rois_per_image=64, roi_positive_fraction=0.25,
                 roi_foreground_iou=0.5, roi_background_iou_low=0.1,
                 box_weights=(10.0, 10.0, 5.0, 5.0), score_threshold=0.05, nms_iou=0.3,
                 max_detections=100, seed=None, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.backbone_name = backbone
        self.backbone_config = dict(backbone_config or {})
        self.feature = feature
        self.fc_dim, self.num_fcs = int(fc_dim), int(num_fcs)
        self.svd_ranks = None if svd_ranks is None else list(svd_ranks)
        self.roi_pooling = roi_pooling
        self.roi_output_size = int(roi_output_size)
        self.rois_per_image = int(rois_per_image)
        self.roi_positive_fraction = float(roi_positive_fraction)
        self.roi_foreground_iou = float(roi_foreground_iou)
        self.roi_background_iou_low = float(roi_background_iou_low)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.score_threshold = float(score_threshold)
        self.nms_iou = float(nms_iou)
        self.max_detections = int(max_detections)
        self.seed = seed

        self.backbone = kd_backbones.get(backbone, **self.backbone_config)
        if feature not in self.backbone.strides:
            raise ValueError(f"Backbone {backbone!r} has no feature map {feature!r}; it has "
                             f"{list(self.backbone.strides)}.")
        self.roi_extractor = RoIExtractor(self.roi_output_size,
                                          strides=(self.backbone.strides[feature],),
                                          method=roi_pooling, name="roi_extractor")
        self.box_head = TwoFCHead(self.fc_dim, self.num_fcs, ranks=self.svd_ranks,
                                  name="box_head")
        self.box_predictor = BoxPredictor(num_classes, name="box_predictor")
        self.sampling_seed = keras.random.SeedGenerator(seed, name="sampling_seed")

    def _head(self, images, rois, training):
        feature = self.backbone(images, training=training)[self.feature]
        pooled = self.roi_extractor(feature, rois)
        return self.box_predictor(self.box_head(pooled))

    def call(self, inputs, training=False):
        images = self.input_images(inputs)
        proposals, valid = _proposals_of(inputs)
        image_shapes = batch_image_shapes(inputs, images)
        logits, deltas = self._head(images, proposals, training)
        return decode_detections(
            tf.nn.softmax(tf.cast(logits, tf.float32)), tf.cast(deltas, tf.float32), proposals,
            valid, image_shapes, weights=self.box_weights, score_threshold=self.score_threshold,
            nms_iou=self.nms_iou, max_detections=self.max_detections)

    def build(self, input_shape=None):
        if self.built:
            return
        images = tf.zeros([1, 64, 64, 3], self.compute_dtype)
        self.call({"images": images, "proposals": tf.constant([[[0.0, 0.0, 32.0, 32.0]]])})
        self.built = True

    def compute_detection_losses(self, batch, training):
        images = tf.cast(batch["images"], self.compute_dtype)
        proposals, valid = _proposals_of(batch)
        gt_boxes, gt_labels = ground_truth(batch)
        sampled = sample_rois(proposals, valid, gt_boxes, gt_labels,
                              num_samples=self.rois_per_image,
                              positive_fraction=self.roi_positive_fraction,
                              foreground_iou=self.roi_foreground_iou,
                              background_iou_low=self.roi_background_iou_low,
                              seed=self.sampling_seed, gt_crowd=ground_truth_crowd(batch))
        logits, deltas = self._head(images, sampled["rois"], training)
        cls, box = box_head_losses(logits, deltas, sampled, weights=self.box_weights)
        return {"roi_cls": cls, "roi_box": box}

    def compress(self, ranks):
        """Truncated-SVD compression of the fc head (section 3.1): returns (model, report).

        The returned model shares every other weight with this one."""
        head, report = truncated_svd_compress(self.box_head, ranks)
        config = self.get_config()
        config["svd_ranks"] = list(ranks)
        compressed = FastRCNN.from_config(config)
        compressed.build()
        for old, new in ((self.backbone, compressed.backbone),
                         (self.box_predictor, compressed.box_predictor)):
            new.set_weights(old.get_weights())
        compressed.box_head.set_weights(head.get_weights())
        return compressed, report

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=self.backbone_name, backbone_config=self.backbone_config,
            feature=self.feature, fc_dim=self.fc_dim, num_fcs=self.num_fcs,
            svd_ranks=self.svd_ranks, roi_pooling=self.roi_pooling,
            roi_output_size=self.roi_output_size, rois_per_image=self.rois_per_image,
            roi_positive_fraction=self.roi_positive_fraction,
            roi_foreground_iou=self.roi_foreground_iou,
            roi_background_iou_low=self.roi_background_iou_low,
            box_weights=list(self.box_weights), score_threshold=self.score_threshold,
            nms_iou=self.nms_iou, max_detections=self.max_detections, seed=self.seed)
        return config


def jittered_proposals(gt_boxes, gt_labels, image_shapes, num_proposals=128, num_near=8,
                       jitter=0.25, seed=None):
    """Proposals around the ground truth plus random boxes: a reproducible stand-in for selective
    search where a data set ships no proposals (tests, the synthetic set).

    For each ground-truth box, `num_near` copies with their centers moved and sides scaled by up to
    `jitter` of the size; the rest of the `num_proposals` slots are uniformly random boxes in the
    image. Padding ground truth (label -1) yields random boxes only.

    Args:
        gt_boxes [B, N, 4], gt_labels [B, N], image_shapes [B, 2]; seed: int or SeedGenerator.

    Returns:
        float32 [B, num_proposals, 4], clipped to the images.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    batch = tf.shape(gt_boxes)[0]
    image_shapes = tf.cast(image_shapes, tf.float32)
    near = tf.repeat(gt_boxes, num_near, axis=1)  # [B, N * num_near, 4]
    near_valid = tf.repeat(gt_labels >= 0, num_near, axis=1)
    size = tf.concat([near[..., 2:] - near[..., :2]] * 2, axis=-1)
    noise = keras.random.uniform(tf.shape(near), -jitter, jitter, seed=seed)
    near = near + noise * size
    h, w = image_shapes[:, 0:1, tf.newaxis], image_shapes[:, 1:2, tf.newaxis]
    corners = keras.random.uniform([batch, num_proposals, 2, 2], 0.0, 1.0, seed=seed)
    xs = tf.sort(corners[..., 0], axis=-1) * w
    ys = tf.sort(corners[..., 1], axis=-1) * h
    random_boxes = tf.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], axis=-1)
    # Valid jittered boxes first, random ones filling the remaining slots.
    order = tf.argsort(tf.cast(near_valid, tf.int32), axis=1, direction="DESCENDING",
                       stable=True)
    near = tf.gather(near, order, batch_dims=1)
    count = tf.reduce_sum(tf.cast(near_valid, tf.int32), axis=1)
    pad = tf.maximum(num_proposals - tf.shape(near)[1], 0)
    near = tf.pad(near, [[0, 0], [0, pad], [0, 0]])[:, :num_proposals]
    take_near = tf.range(num_proposals)[tf.newaxis, :] < count[:, tf.newaxis]
    boxes = tf.where(take_near[..., tf.newaxis], near, random_boxes)
    return ops.clip_boxes(boxes, image_shapes)
