"""Mask R-CNN (He et al. 2017): Faster R-CNN plus a mask branch on RoIAlign features.

Training (paper section 3.1): the mask loss is computed on the foreground RoIs of the box
branch's sample only, against the matched ground-truth mask cropped to the RoI at 28 x 28 and
binarized at 0.5; the loss is the per-pixel sigmoid cross entropy of the ground-truth class's
channel (`kerasdet.losses.mask_loss`). Inference (section 3.1, "Inference"): the box branch's top
100 detections after NMS go through the mask branch; each takes its class's channel, sigmoid, and
is pasted into the image and binarized at 0.5 inside the graph, so an exported SavedModel returns
the masks too.
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.heads.mask_head import (MaskHead, checked_mask_grids, detection_masks,
                                     mask_targets)
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.models.faster_rcnn import FasterRCNN

__all__ = ["MaskRCNN"]


@keras.saving.register_keras_serializable(package="kerasdet")
class MaskRCNN(FasterRCNN):
    """Mask R-CNN: every FasterRCNN argument, plus the mask branch.

    With fpn=True (the default) RoIs are pooled for the mask branch from P2..P5 by the FPN level
    rule; with fpn=False from the single C4 map (whatever the box head), still through the FPN-style
    head below (not the paper's res5-shared C4 mask head).

    Args:
        mask_pool_size: RoIAlign output of the mask branch (14; the head outputs twice that, 28).
        mask_sampling_ratio: RoIAlign samples per bin side; 0 (Detectron2's default) means adaptive,
            ceil(RoI size / pool size) per side, torchvision uses 2.
        mask_channels / mask_num_convs: width and depth of the head (256 and 4 in the paper).
        mask_rois_per_image: at most this many foreground RoIs per image train the mask branch
            (None: all of them, as in the paper). The sampler's positives come in random order, so
            a cap takes a random subset; it bounds the mask branch's training cost.
        mask_threshold: probability at which predicted masks (and training targets) are binarized.
        paste_masks: True: predict returns image-sized masks `masks` uint8 [B, K, H, W] (0/1 on the
            padded input canvas, zeros in empty detection slots). False: the per-box grids
            `masks` float32 [B, K, 28, 28] of probabilities (kerasdet.evaluation pastes those;
            cheaper for large images).
        Other arguments: see FasterRCNN.

    Predict output: FasterRCNN's boxes / scores / classes / num_detections plus `masks`.
    """

    loss_names = FasterRCNN.loss_names + ("mask",)

    def __init__(self, num_classes, mask_pool_size=14, mask_sampling_ratio=0, mask_channels=256,
                 mask_num_convs=4, mask_rois_per_image=None, mask_threshold=0.5, paste_masks=True,
                 **kwargs):
        kwargs.setdefault("roi_pooling", "roi_align")
        super().__init__(num_classes, **kwargs)
        self.mask_pool_size = int(mask_pool_size)
        self.mask_size = 2 * self.mask_pool_size
        self.mask_sampling_ratio = int(mask_sampling_ratio)
        self.mask_channels = int(mask_channels)
        self.mask_num_convs = int(mask_num_convs)
        self.mask_threshold = float(mask_threshold)
        self.paste_masks = bool(paste_masks)
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"`mask_threshold` must be in (0, 1), got {mask_threshold!r}.")
        self.mask_roi_extractor = RoIExtractor(
            self.mask_pool_size, strides=self.roi_extractor.strides, method="roi_align",
            sampling_ratio=self.mask_sampling_ratio, aligned=self.roi_aligned, name="mask_roi_extractor")
        self.mask_head = MaskHead(num_classes, channels=self.mask_channels,
                                  num_convs=self.mask_num_convs, name="mask_head")
        # The sampler puts positives first and takes at most this many per image, so the mask
        # branch only needs the leading slots of the sample (a quarter of them by default).
        self.max_mask_rois = max(1, int(self.roi_settings["batch_size"]
                                        * self.roi_settings["positive_fraction"]))
        self.mask_rois_per_image = None if mask_rois_per_image is None else int(mask_rois_per_image)
        if self.mask_rois_per_image is not None:
            if self.mask_rois_per_image < 1:
                raise ValueError(f"`mask_rois_per_image` must be >= 1 or None, got "
                                 f"{mask_rois_per_image!r}.")
            self.max_mask_rois = min(self.max_mask_rois, self.mask_rois_per_image)

    def mask_logits(self, roi_features, boxes):
        """[B, R, 4] boxes -> per-class mask logits [B, R, 28, 28, K] (float32)."""
        pooled = self.mask_roi_extractor(roi_features, boxes)
        return tf.cast(self.mask_head(pooled), tf.float32)

    @staticmethod
    def _gt_masks(batch):
        """(grids [B, N, G, G], boxes [B, N, 4]): the batch's per-instance mask grids and the
        ground-truth boxes they cover (kerasdet.data.pipeline's layout)."""
        masks = batch.get("masks") if isinstance(batch, dict) else None
        if masks is None and isinstance(batch, dict):
            masks = batch["bounding_boxes"].get("masks")
        if masks is None:
            raise ValueError("MaskRCNN needs instance masks in the batch: `masks` [B, N, G, G] "
                             "grids over the boxes (build_dataset(..., with_masks=True)).")
        return checked_mask_grids(masks, batch["bounding_boxes"]["boxes"])

    # -- FasterRCNN hooks extended with the mask branch ------------------------------------------
    def second_stage_losses(self, context, training):
        gt_masks, gt_boxes = self._gt_masks(context["batch"])
        losses = super().second_stage_losses(context, training)
        losses["mask"] = self.mask_loss(context["roi_features"], context["sampled"], gt_masks,
                                        gt_boxes)
        return losses

    def mask_loss(self, roi_features, sampled, gt_masks, gt_boxes):
        """Mask loss on the foreground RoIs of `sampled` (sample_rois output); `gt_masks`
        [B, N, G, G] grids covering `gt_boxes` [B, N, 4]."""
        k = self.max_mask_rois
        rois = sampled["rois"][:, :k]
        fg_labels = sampled["labels"][:, :k]
        foreground = fg_labels > 0
        targets = mask_targets(gt_masks, gt_boxes, rois, sampled["matched_index"][:, :k],
                               self.mask_size, threshold=self.mask_threshold)
        logits = self.mask_logits(roi_features, rois)
        return kd_losses.mask_loss(targets, logits, tf.maximum(fg_labels - 1, 0),
                                   weights=tf.cast(foreground, tf.float32))

    def detect(self, images, image_shapes, training=False):
        roi_features, proposals, valid = self.first_stage_inference(images, image_shapes,
                                                                    training)
        outputs = self.detect_boxes(roi_features, proposals, valid, image_shapes, training)
        outputs["masks"] = self.detection_masks(roi_features, outputs, tf.shape(images)[1:3])
        return outputs

    def detection_masks(self, roi_features, detections, canvas_size):
        """Masks of the final detections (see kerasdet.heads.mask_head.detection_masks)."""
        logits = self.mask_logits(roi_features, tf.stop_gradient(detections["boxes"]))
        return detection_masks(logits, detections, canvas_size, self.mask_threshold,
                               self.paste_masks)

    def get_config(self):
        config = super().get_config()
        config.update(mask_pool_size=self.mask_pool_size,
                      mask_sampling_ratio=self.mask_sampling_ratio,
                      mask_channels=self.mask_channels, mask_num_convs=self.mask_num_convs,
                      mask_rois_per_image=self.mask_rois_per_image,
                      mask_threshold=self.mask_threshold, paste_masks=self.paste_masks)
        return config
