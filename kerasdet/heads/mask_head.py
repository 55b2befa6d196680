"""Mask R-CNN's mask branch (He et al. 2017): the FCN head on 14x14 RoIAlign features, its training
targets, and the test-time paste of the per-box masks into image coordinates.

Geometry shared by targets and paste (continuous pixel coordinates, no +1): an M x M mask grid of a
box (x1, y1, x2, y2) has cell (i, j) centred at x = x1 + (j + 0.5) * (x2 - x1) / M,
y = y1 + (i + 0.5) * (y2 - y1) / M; an image pixel (r, c) covers [c, c + 1) x [r, r + 1) and its
centre is (c + 0.5, r + 0.5).
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.heads.part_config import part_config
from kerasdet.layers.winograd import WinogradConv2D
from kerasdet.ops.masks import resample_masks
from kerasdet.ops.xla import in_xla_context

__all__ = ["batch_mask_grids", "checked_mask_grids", "detection_masks", "MaskBranch",
           "MaskConfig", "MaskHead", "mask_targets", "paste_masks", "select_class_masks"]


@part_config("mask_")
class MaskConfig:
    """The mask branch: RoIAlign output `pool_size` (14; the head outputs twice that) with
    `sampling_ratio` samples per bin side (0 = adaptive, torchvision uses 2), head width
    `channels` and depth `num_convs` (256 and 4 in the paper), at most `rois_per_image`
    foreground RoIs per image in the loss (None: the RoI sample's foreground quota), and the
    probability `threshold` that binarizes targets and predicted masks."""
    pool_size: int = 14
    sampling_ratio: int = 0
    channels: int = 256
    num_convs: int = 4
    rois_per_image: int = None
    threshold: float = 0.5

    def __post_init__(self):
        if self.rois_per_image is not None and int(self.rois_per_image) < 1:
            raise ValueError(f"`mask_rois_per_image` must be >= 1 or None, got "
                             f"{self.rois_per_image!r}.")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"`mask_threshold` must be in (0, 1), got {self.threshold!r}.")

    @property
    def mask_size(self):
        return 2 * int(self.pool_size)

    def max_rois(self, roi_quota):
        """Foreground RoIs per image the loss reads: the sampler's quota, capped by
        `rois_per_image`."""
        if self.rois_per_image is None:
            return roi_quota
        return min(roi_quota, int(self.rois_per_image))


def batch_mask_grids(batch):
    """(grids [B, N, G, G], boxes [B, N, 4]): the batch's per-instance mask grids and the
    ground-truth boxes they cover (kerasdet.data.pipeline's layout)."""
    masks = batch.get("masks") if isinstance(batch, dict) else None
    if masks is None and isinstance(batch, dict):
        masks = batch["bounding_boxes"].get("masks")
    if masks is None:
        raise ValueError("This detector's mask branch needs instance masks in the batch: `masks` "
                         "[B, N, G, G] grids over the boxes (build_dataset(..., with_masks=True)).")
    return checked_mask_grids(masks, batch["bounding_boxes"]["boxes"])


class MaskBranch:
    """Mask R-CNN's mask branch as a part: RoIAlign features of the boxes -> `MaskHead` logits;
    the loss on the foreground of labelled RoIs, and the test-time masks of the detections.

    extractor: a RoIExtractor (14 x 14 RoIAlign); head: a MaskHead; max_rois: foreground RoIs per
    image the loss reads (`MaskConfig.max_rois`).
    """

    def __init__(self, extractor, head, config, max_rois):
        self.extractor, self.head, self.config = extractor, head, config
        self.max_rois = int(max_rois)

    def logits(self, features, boxes, training=False):
        """[B, R, 4] boxes -> per-class mask logits [B, R, 2S, 2S, K] (float32)."""
        return tf.cast(self.head(self.extractor(features, boxes), training=training), tf.float32)

    def loss(self, features, targets, gt_masks, gt_boxes, training=False):
        """Per-pixel sigmoid cross entropy of the class channel on the foreground RoIs of
        `targets` (`sample_rois` / `relabel_rois` dict): foreground moved to the front (a stable
        sort, so a sample's order is kept), at most `max_rois` per image. `gt_masks` [B, N, G, G]
        are grids covering `gt_boxes` [B, N, 4]."""
        labels = targets["labels"]
        k = self.max_rois if labels.shape[1] is None else min(self.max_rois, labels.shape[1])
        foreground = tf.cast(labels > 0, tf.int32)
        order = tf.argsort(foreground, axis=1, direction="DESCENDING", stable=True)[:, :k]
        if not in_xla_context():
            # Only foreground RoIs have a mask loss: run the head on the batch's largest foreground
            # count, not the whole quota. The rows left out weigh 0, so the loss and its gradient are
            # the same. With the greedy RPN NMS (kerasdet.ops.boxes) a Mask R-CNN R50-FPN training
            # step went from 10.9 to 9.4 s (benchmarks/train_speed.py). XLA needs the fixed quota.
            count = tf.clip_by_value(tf.reduce_max(tf.reduce_sum(foreground, axis=1)), 1, k)
            order = order[:, :count]
        labels = tf.gather(labels, order, batch_dims=1)
        rois = tf.gather(targets["rois"], order, batch_dims=1)
        matched = tf.gather(targets["matched_index"], order, batch_dims=1)
        grids = mask_targets(gt_masks, gt_boxes, rois, matched, self.config.mask_size,
                             threshold=self.config.threshold)
        return kd_losses.mask_loss(grids, self.logits(features, rois, training), tf.maximum(labels - 1, 0),
                                   weights=tf.cast(labels > 0, tf.float32))

    def masks(self, features, detections, canvas_size, paste):
        """Masks of the final detections (see `detection_masks`)."""
        logits = self.logits(features, tf.stop_gradient(detections["boxes"]))
        return detection_masks(logits, detections, canvas_size, self.config.threshold, paste)


def _he_normal_fan_out():
    # Detectron2's c2_msra_fill: He initialisation over fan-out, untruncated normal.
    return keras.initializers.VarianceScaling(2.0, mode="fan_out",
                                              distribution="untruncated_normal")


@keras.saving.register_keras_serializable(package="kerasdet")
class MaskHead(keras.layers.Layer):
    """The FPN variant of the Mask R-CNN mask head (paper figure 4, right).

    [B, R, S, S, C] RoI features -> `num_convs` x (3x3 conv `channels` + ReLU) -> 2x2 stride-2
    deconv `channels` + ReLU -> 1x1 conv to `num_classes` mask logits: [B, R, 2S, 2S, K]
    (channels-last; 14x14 in, 28x28 out in the paper). One mask per dataset class, no background
    channel: the loss and the test-time output use only the channel of the RoI's class.
    """

    def __init__(self, num_classes, channels=256, num_convs=4, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1 or int(channels) < 1 or int(num_convs) < 0:
            raise ValueError(f"MaskHead needs num_classes >= 1, channels >= 1 and num_convs >= 0, "
                             f"got {num_classes}, {channels}, {num_convs}.")
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.num_convs = int(num_convs)
        self.convs = [WinogradConv2D(self.channels, 3, padding="same", activation="relu",
                                     kernel_initializer=_he_normal_fan_out(),
                                     name=f"mask_fcn{i + 1}")
                      for i in range(self.num_convs)]
        self.deconv = keras.layers.Conv2DTranspose(self.channels, 2, strides=2, activation="relu",
                                                   kernel_initializer=_he_normal_fan_out(),
                                                   name="deconv")
        # Small normal initialisation of the predictor as in the reference implementations.
        self.predictor = keras.layers.Conv2D(
            self.num_classes, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.001),
            name="mask_logits")

    def build(self, input_shape):
        size = input_shape[2]
        shape = (None, size, size, int(input_shape[-1]))
        for conv in self.convs:
            conv.build(shape)
            shape = (None, size, size, self.channels)
        self.deconv.build(shape)
        up = None if size is None else 2 * size
        self.predictor.build((None, up, up, self.channels))

    def call(self, pooled, training=None):
        """pooled [B, R, S, S, C] -> mask logits [B, R, 2S, 2S, K]."""
        if pooled.shape.rank != 5:
            raise ValueError(f"MaskHead expects RoI features [B, R, S, S, C], got {pooled.shape}.")
        batch, num = tf.shape(pooled)[0], tf.shape(pooled)[1]
        # Static spatial size and channels keep the convs' input shapes known.
        x = tf.reshape(pooled, [-1, *pooled.shape[2:]])
        for conv in self.convs:
            x = conv(x, training=training)
        x = self.predictor(self.deconv(x))
        return tf.reshape(x, [batch, num, *x.shape[1:]])

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, channels=self.channels,
                      num_convs=self.num_convs)
        return config


def checked_mask_grids(masks, boxes):
    """(masks, boxes) as tensors after checking the batch layout: grids [B, N, G, G] aligned with
    the boxes [B, N, 4] they cover (same B and N)."""
    masks = tf.convert_to_tensor(masks)
    boxes = tf.convert_to_tensor(boxes)
    if masks.shape.rank != 4 or (masks.shape[1] is not None and boxes.shape[1] is not None
                                 and masks.shape[1] != boxes.shape[1]):
        raise ValueError(f"batch `masks` must be [B, N, G, G] grids with the N of "
                         f"`bounding_boxes` {boxes.shape}, got {masks.shape}.")
    return masks, boxes


def mask_targets(gt_masks, gt_boxes, rois, matched_index, mask_size=28, threshold=0.5):
    """Mask R-CNN training targets: each RoI's matched instance mask, cropped to the RoI, resized to
    `mask_size` x `mask_size` and binarized.

    The ground truth comes as per-instance grids (the pipeline's batch layout): ``gt_masks[b, n]``
    covers the box ``gt_boxes[b, n]``. Cell (i, j) of a target takes the bilinear interpolation of
    the grid at the cell's centre (geometry in the module docstring and kerasdet.ops.masks); parts
    of the RoI outside the ground-truth box read 0. One bilinear sample per cell, as
    tf.image.crop_and_resize does it, rather than Detectron2's RoIAlign average: both are the
    paper's "intersection between the RoI and its associated ground-truth mask" resampled to m x m.
    Measured against targets cut from full-resolution masks (tests/test_mask_rcnn.py): with the
    pipeline's 112 x 112 soft grids, about 0.5 % of the targets' boundary pixels differ.

    Args:
        gt_masks: [B, N, G, G] grids with values in [0, 1] (the pipeline's float16 coverage, uint8
            or bool 0/1, or float), aligned with the ground-truth rows (N may be 0). A full image
            mask is the special case of a grid whose box is the whole canvas.
        gt_boxes: [B, N, 4] the box each grid covers (the batch's ``bounding_boxes["boxes"]``).
        rois: [B, R, 4] boxes (x1, y1, x2, y2) in the pixels of the ground-truth boxes.
        matched_index: int [B, R] ground-truth row of each RoI; values outside [0, N) (e.g. the
            padding row that `kerasdet.models.base.ground_truth` appends) give an all-zero target.
        mask_size: M.
        threshold: targets are ``sample >= threshold`` (0.5 in the paper); None keeps the soft
            bilinear values.

    Returns float32 [B, R, M, M].
    """
    gt_masks = tf.convert_to_tensor(gt_masks)
    gt_boxes = tf.cast(tf.convert_to_tensor(gt_boxes), tf.float32)
    rois = tf.cast(tf.convert_to_tensor(rois), tf.float32)
    matched_index = tf.convert_to_tensor(matched_index)
    if gt_masks.shape.rank != 4:
        raise ValueError(f"`gt_masks` must be [B, N, G, G] grids, got {gt_masks.shape}.")
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"`gt_boxes` must be [B, N, 4], got {gt_boxes.shape}.")
    if rois.shape.rank != 3 or rois.shape[-1] != 4:
        raise ValueError(f"`rois` must be [B, R, 4], got {rois.shape}.")
    if not matched_index.dtype.is_integer:
        raise TypeError(f"`matched_index` must be integer, got {matched_index.dtype.name}.")
    if matched_index.shape.rank != 2:
        raise ValueError(f"`matched_index` must be [B, R], got {matched_index.shape}.")
    if gt_masks.dtype == tf.bool:
        gt_masks = tf.cast(gt_masks, tf.uint8)
    mask_size = int(mask_size)
    shape = tf.shape(gt_masks)
    batch, num_gt, grid_h, grid_w = shape[0], shape[1], shape[2], shape[3]
    num_rois = tf.shape(rois)[1]
    # One all-zero row after the real ones (its box is empty, so it reads 0 everywhere): unmatched
    # RoIs (and batches without objects, N = 0) point there, so every index is valid.
    grids = tf.concat([gt_masks, tf.zeros([batch, 1, grid_h, grid_w], gt_masks.dtype)], axis=1)
    boxes = tf.concat([gt_boxes, tf.zeros([batch, 1, 4])], axis=1)
    index = tf.cast(matched_index, tf.int32)
    index = tf.where((index >= 0) & (index < num_gt), index, num_gt)
    flat_index = tf.reshape(index + tf.range(batch)[:, tf.newaxis] * (num_gt + 1), [-1])
    crops = resample_masks(tf.reshape(grids, [-1, grid_h, grid_w]), tf.reshape(boxes, [-1, 4]),
                           tf.reshape(rois, [-1, 4]), flat_index, (mask_size, mask_size))
    crops = tf.reshape(crops, [batch, num_rois, mask_size, mask_size])
    if threshold is not None:
        crops = tf.cast(crops >= threshold, tf.float32)
    return tf.stop_gradient(crops)


def select_class_masks(mask_logits, classes):
    """[..., M, M, K] per-class masks and int [...] 0-based classes -> [..., M, M], the channel of
    each entry's class (negative classes, i.e. empty detection slots, read channel 0)."""
    num_classes = mask_logits.shape[-1]
    classes = tf.clip_by_value(tf.cast(classes, tf.int32), 0, num_classes - 1)
    one_hot = tf.one_hot(classes, num_classes, dtype=mask_logits.dtype)
    return tf.reduce_sum(mask_logits * one_hot[..., tf.newaxis, tf.newaxis, :], axis=-1)


def paste_masks(masks, boxes, image_size, threshold=None):
    """Pastes per-box M x M masks into H x W image masks, in the graph.

    Image pixel (r, c) whose centre (c + 0.5, r + 0.5) lies in [x1, x2) x [y1, y2) takes the
    bilinear interpolation of its box's mask grid at grid position
    u = (c + 0.5 - x1) / (x2 - x1) * M - 0.5, v = (r + 0.5 - y1) / (y2 - y1) * M - 0.5, with u, v
    clamped to [0, M - 1] (the edge cells extend to the box border); pixels outside the box are 0.
    This is the definition `kerasdet.evaluation.paste_masks` implements in numpy, so in-graph and
    evaluation-time pasting agree.

    That is `kerasdet.ops.resample_masks` of each grid (covering its box) onto the whole canvas:
    one resampling op for the whole batch.

    Args:
        masks: [B, K, M, M] per-box values (probabilities).
        boxes: [B, K, 4] (x1, y1, x2, y2) in pixels of the output canvas.
        image_size: (H, W) Python ints or a tensor.

    Returns float32 [B, K, H, W]; with a number `threshold`, bool ``pasted >= threshold``
    (computed without the float canvas select, see `resample_masks`). Memory: B * K * H * W
    floats (about 390 MB for 100 masks on an 800 x 1216 canvas).
    """
    masks = tf.cast(tf.convert_to_tensor(masks), tf.float32)
    boxes = tf.cast(tf.convert_to_tensor(boxes), tf.float32)
    if masks.shape.rank != 4:
        raise ValueError(f"`masks` must be [B, K, M, M], got {masks.shape}.")
    if boxes.shape.rank != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"`boxes` must be [B, K, 4], got {boxes.shape}.")
    image_size = tf.cast(tf.convert_to_tensor(image_size), tf.int32)
    shape = tf.shape(masks)
    batch, num = shape[0], shape[1]
    count = batch * num
    # Pasting is resampling each grid onto a "box" that is the whole canvas, one cell per pixel.
    canvas = tf.cast(tf.stack([0, 0, image_size[1], image_size[0]]), tf.float32)
    pasted = resample_masks(tf.reshape(masks, [count, shape[2], shape[3]]),
                            tf.reshape(boxes, [-1, 4]), tf.tile(canvas[tf.newaxis], [count, 1]),
                            tf.range(count), image_size, threshold=threshold)
    return tf.reshape(pasted, [batch, num, image_size[0], image_size[1]])


def detection_masks(mask_logits, detections, canvas_size, threshold=0.5, paste=True):
    """Test-time masks of the final detections (Mask R-CNN section 3): each detection's class
    channel of `mask_logits` [B, K, M, M, C], sigmoid, then either the M x M probabilities or,
    with `paste`, masks pasted into the [H, W] canvas and binarized at `threshold` (uint8 0/1).
    Slots beyond num_detections are zero."""
    boxes = tf.stop_gradient(detections["boxes"])
    probs = tf.sigmoid(select_class_masks(mask_logits, detections["classes"]))
    slots = tf.range(tf.shape(boxes)[1])[tf.newaxis, :]
    filled = (slots < detections["num_detections"][:, tf.newaxis]) & (detections["classes"] >= 0)
    if not paste:
        return tf.where(filled[..., tf.newaxis, tf.newaxis], probs, 0.0)
    binary = paste_masks(probs, boxes, canvas_size, threshold=threshold) & filled[
        ..., tf.newaxis, tf.newaxis]
    return tf.cast(binary, tf.uint8)
