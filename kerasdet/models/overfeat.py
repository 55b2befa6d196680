"""OverFeat (Sermanet et al., "OverFeat: Integrated Recognition, Localization and Detection using
Convolutional Networks", ICLR 2014): classification, localization and detection with one
sliding-window ConvNet.

    images (at each scale) -> OverFeat layers 1-5 (kerasdet.backbones.overfeat) -> unpooled top map
      -> max pooling p x p at the p^2 offsets (fine stride; p = 3 accurate, 2 fast)
      -> classifier (k x k fc layers as convolutions, K + 1 outputs, 0 = background) and
         regressor (k x k -> 4096 -> 1024 -> 4 box edges, shared or per class) on every copy
      -> interleaved maps: one window of the training input size every s input pixels
         (s = stride of the unpooled map: 12 accurate, 16 fast; p * s with the coarse stride)

Training (computed densely on the whole image: training on every window crop at once, except at a
crop's border, where a lone crop's padded inner convolutions see zeros and the dense map sees the
neighbouring pixels; benchmarks/overfeat.py measures the difference):
a window is a positive of ground truth g when g lies mostly inside it (coverage = |w & g| / |g|
>= `positive_coverage`) and fills it enough (IoU >= `positive_iou`); a negative when every ground
truth has coverage < `negative_coverage`; the rest are ignored. Negatives are taken on the fly per
image (`negatives="random"` or the most offending, "hard"), `negatives_per_image` of them. Softmax
cross entropy over positives and sampled negatives. The regressor is trained with an L2 loss on the
windows holding >= 50 % of a ground truth (section 4.2), to that ground truth's edges in window
units; the regressor sees the features through stop_gradient (the paper fixes layers 1-5 when it
trains the regressor), so the features are the classifier's.

Inference (section 4.3): at every scale, C_s = the `top_k_classes` classes with the largest
spatial max; every window's regressed box for a class of C_s with probability >= `score_threshold`
is a candidate; the candidates of all scales (at most `max_merge_boxes`, the highest) are merged
greedily per class (kerasdet.ops.overfeat.greedy_merge) and a merged box's score is the sum of the
class probabilities of the windows behind it (not a probability: it rewards coherent boxes). The
merge is a tf.while_loop, so predict and export run it in the graph.

Classification protocol (section 3.3): `classify(images)` = the mean over scales and flips of each
class's spatial max of the softmax.
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.backbones.overfeat import OVERFEAT_CONVS, OVERFEAT_FULL, TRAINING_INPUT_SIZE, OverFeat
from kerasdet.heads.overfeat import OverFeatClassifier, OverFeatRegressor
from kerasdet.models.base import Detector, ground_truth
from kerasdet.ops import overfeat as of_ops
from kerasdet.ops.boxes import box_iou, clip_boxes

__all__ = ["OverFeatDetector", "PAPER_SCALES", "TABLE2_PROTOCOLS"]

# The paper's table-5 input sizes (accurate model) as (height, width).
PAPER_SCALES = ((245, 245), (281, 317), (317, 389), (389, 461), (425, 497), (461, 569))

# The classification rows of the paper's table 2 as (indices into the model's six scales, fine
# stride): "1 scale" is table 5's first scale, "4 scales" its scales 1, 2, 4 and 6.
TABLE2_PROTOCOLS = {
    "coarse_1_scale": ((0,), False),
    "fine_1_scale": ((0,), True),
    "fine_4_scales": ((0, 1, 3, 5), True),
    "fine_6_scales": ((0, 1, 2, 3, 4, 5), True),
}


def _scale_setting(scale, name):
    """A scale is a factor of the input's size (float) or an exact input size [height, width]
    (table 5's sizes)."""
    if isinstance(scale, (list, tuple)):
        if len(scale) != 2 or not all(int(v) == v and v >= 1 for v in scale):
            raise ValueError(f"`{name}`: an exact size must be [height, width] in pixels, got {scale!r}")
        return (int(scale[0]), int(scale[1]))
    if not float(scale) > 0:
        raise ValueError(f"`{name}`: a scale factor must be > 0, got {scale!r}")
    return float(scale)


@keras.saving.register_keras_serializable(package="kerasdet")
class OverFeatDetector(Detector):
    loss_names = ("cls", "box")

    def __init__(self, num_classes, variant="tiny", classifier_dims=None, regressor_dims=(4096, 1024),
                 class_specific_regressor=False, dropout=0.5, fine_stride=True, scales=(1.0,),
                 train_scales=(1.0,), flips=False, top_k_classes=5, merge_threshold=0.5,
                 score_threshold=0.05, max_merge_boxes=200, max_detections=100,
                 positive_coverage=0.75, positive_iou=0.2, negative_coverage=0.3,
                 regression_coverage=0.5, negatives="random", negatives_per_image=32,
                 input_normalization=None, seed=None, class_names=None, input_settings=None, **kwargs):
        super().__init__(num_classes, class_names=class_names, input_settings=input_settings, **kwargs)
        if negatives not in ("random", "hard"):
            raise ValueError(f"`negatives` must be 'random' or 'hard', got {negatives!r}")
        self.settings = dict(
            variant=variant, classifier_dims=tuple(classifier_dims or [d for d, _ in OVERFEAT_FULL[variant][:-1]]),
            regressor_dims=tuple(regressor_dims), class_specific_regressor=bool(class_specific_regressor),
            dropout=float(dropout), fine_stride=bool(fine_stride), scales=tuple(_scale_setting(s, "scales") for s in scales),
            train_scales=tuple(_scale_setting(s, "train_scales") for s in train_scales), flips=bool(flips),
            top_k_classes=int(top_k_classes), merge_threshold=float(merge_threshold),
            score_threshold=float(score_threshold), max_merge_boxes=int(max_merge_boxes),
            max_detections=int(max_detections), positive_coverage=float(positive_coverage),
            positive_iou=float(positive_iou), negative_coverage=float(negative_coverage),
            regression_coverage=float(regression_coverage), negatives=negatives,
            negatives_per_image=int(negatives_per_image), input_normalization=input_normalization,
            seed=seed)
        for key, value in self.settings.items():
            setattr(self, key, value)
        self.pool = OVERFEAT_CONVS[variant][-1][4]
        self.kernel = OVERFEAT_FULL[variant][0][1]
        self.window = TRAINING_INPUT_SIZE[variant]
        self.backbone = OverFeat(variant=variant, include_top=False, input_normalization=input_normalization,
                                 name=f"overfeat_{variant}")
        self.feature_stride = self.backbone.strides["features"]
        self.classifier = OverFeatClassifier(self.num_classes + 1, self.kernel, self.classifier_dims,
                                             dropout=self.dropout, name="classifier")
        self.regressor = OverFeatRegressor(self.num_classes, self.kernel, self.regressor_dims,
                                           class_specific=self.class_specific_regressor, name="regressor")
        self._generator = tf.random.Generator.from_seed(seed if seed is not None else 0)

    # -- dense evaluation ------------------------------------------------------------------------
    def dense(self, images, training=False, fine_stride=None):
        """Class logits [B, H, W, K + 1], box offsets [B, H, W, 4 or 4K] (float32) and the windows
        [H, W, 4] of one scale."""
        fine = self.fine_stride if fine_stride is None else fine_stride
        features = self.backbone(images, training=training)["features"]
        offsets = None if fine else [(0, 0)]
        copies = of_ops.offset_max_pool(features, self.pool, offsets)
        shape = tf.shape(copies)
        flat = tf.reshape(copies, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))
        logits = tf.cast(self.classifier(flat, training=training), tf.float32)
        # the regressor is trained on fixed features (section 4.2)
        deltas = tf.cast(self.regressor(tf.stop_gradient(flat), training=training), tf.float32)

        def arrange(x):
            s = tf.shape(x)
            x = tf.reshape(x, tf.concat([shape[:2], s[1:]], 0))
            return of_ops.interleave_offsets(x, self.pool) if fine else x[0]

        logits, deltas = arrange(logits), arrange(deltas)
        stride = self.feature_stride if fine else self.feature_stride * self.pool
        windows = of_ops.window_boxes(tf.shape(logits)[1], tf.shape(logits)[2], stride, self.window)
        return logits, deltas, windows

    def protocol(self, name):
        """{"scales", "fine_stride"} of a row of the paper's table 2 (TABLE2_PROTOCOLS), taken from
        this model's six scales; pass them to `classify` or `detect`."""
        if name not in TABLE2_PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; choose one of {sorted(TABLE2_PROTOCOLS)}")
        indices, fine = TABLE2_PROTOCOLS[name]
        if len(self.scales) != 6:
            raise ValueError(f"protocol {name!r} picks among table 5's six scales; this model has "
                             f"{len(self.scales)} scales {list(self.scales)}")
        return {"scales": tuple(self.scales[i] for i in indices), "fine_stride": fine}

    def _scaled(self, images, image_shapes, scale):
        if isinstance(scale, tuple):  # an exact input size
            size = tf.constant(scale, tf.int32)
        elif scale == 1.0:
            return images, image_shapes
        else:
            size = tf.cast(tf.round(tf.cast(tf.shape(images)[1:3], tf.float32) * scale), tf.int32)
        # the smallest input every offset copy gives one classifier output for
        size = tf.maximum(size, self.window + (self.pool - 1) * self.feature_stride)
        factor = tf.cast(size, tf.float32) / tf.cast(tf.shape(images)[1:3], tf.float32)
        resized = tf.cast(tf.image.resize(tf.cast(images, tf.float32), size), images.dtype)
        return resized, image_shapes * factor[None]

    def _valid_windows(self, windows, image_shapes):
        """[B, N]: the window's centre lies in the image (not in the batch's padding)."""
        centres = (windows[:, :2] + windows[:, 2:]) / 2.0
        return ((centres[None, :, 0] < image_shapes[:, None, 1])
                & (centres[None, :, 1] < image_shapes[:, None, 0]))

    def _boxes(self, deltas, windows):
        """[B, N, 4] or [B, N, K, 4] boxes from offsets in window units."""
        b = tf.shape(deltas)[0]
        deltas = tf.reshape(deltas, [b, -1, tf.shape(deltas)[-1] // 4, 4])
        boxes = windows[None, :, None, :] + deltas * float(self.window)
        # an untrained regressor can cross its edges; a box is the rectangle its edges span
        boxes = tf.concat([tf.minimum(boxes[..., :2], boxes[..., 2:]),
                           tf.maximum(boxes[..., :2], boxes[..., 2:])], -1)
        return boxes if self.class_specific_regressor else boxes[:, :, 0]

    # -- training --------------------------------------------------------------------------------
    def compute_detection_losses(self, batch, training):
        images = batch["images"]
        gt_boxes, gt_labels = ground_truth(batch)
        image_shapes = tf.cast(batch["image_info"][:, 4:6], tf.float32)
        labels_all, logits_all, weights_all = [], [], []
        box_t, box_p, box_w = [], [], []
        for scale in self.train_scales:
            scaled, shapes = self._scaled(images, image_shapes, scale)
            factor = shapes / tf.maximum(image_shapes, 1.0)  # (y, x)
            boxes = gt_boxes * tf.tile(factor[:, ::-1], [1, 2])[:, None, :]
            logits, deltas, windows = self.dense(scaled, training=training)
            b = tf.shape(logits)[0]
            logits = tf.reshape(logits, [b, -1, self.num_classes + 1])
            windows = tf.reshape(windows, [-1, 4])
            valid = self._valid_windows(windows, shapes)
            real = gt_labels >= 0  # [B, M]
            cover = tf.map_fn(lambda g: of_ops.coverage(windows, g), boxes)  # [B, N, M]
            iou = tf.map_fn(lambda g: box_iou(windows, g), boxes)
            cover = tf.where(real[:, None, :], cover, 0.0)
            iou = tf.where(real[:, None, :], iou, 0.0)
            positive_pair = (cover >= self.positive_coverage) & (iou >= self.positive_iou)
            best = tf.argmax(tf.where(positive_pair, iou, -1.0), axis=-1, output_type=tf.int32)
            positive = tf.reduce_any(positive_pair, -1) & valid
            negative = (tf.reduce_max(cover, -1) < self.negative_coverage) & valid & ~positive
            labels = tf.where(positive, tf.gather(gt_labels, best, batch_dims=1) + 1, 0)
            # negatives on the fly: random or the most offending windows of each image
            if self.negatives == "hard":
                rank = tf.stop_gradient(kd_losses.softmax_cross_entropy(tf.zeros_like(labels), logits))
            else:
                rank = self._generator.uniform(tf.shape(labels))
            rank = tf.where(negative, rank, -1.0)
            k = tf.minimum(self.negatives_per_image, tf.shape(rank)[1])
            kth = tf.math.top_k(rank, k).values[:, -1:]
            chosen = negative & (rank >= kth)
            labels_all.append(labels)
            logits_all.append(logits)
            weights_all.append(tf.cast(positive | chosen, tf.float32))
            # regressor: windows holding >= 50 % of a ground truth, to the best-covered one
            reg_pair = cover >= self.regression_coverage
            reg_best = tf.argmax(cover, axis=-1, output_type=tf.int32)
            reg = tf.reduce_any(reg_pair, -1) & valid
            target_boxes = tf.gather(boxes, reg_best, batch_dims=1)
            targets = (target_boxes - windows[None]) / float(self.window)
            pred = tf.reshape(deltas, [b, tf.shape(windows)[0], -1])
            if self.class_specific_regressor:
                pred = tf.reshape(pred, [b, -1, self.num_classes, 4])
                cls = tf.maximum(tf.gather(gt_labels, reg_best, batch_dims=1), 0)
                pred = tf.gather(pred, cls, batch_dims=2)
            box_t.append(targets)
            box_p.append(pred)
            box_w.append(tf.cast(reg, tf.float32))
        labels = tf.concat(labels_all, 1)
        cls_loss = kd_losses.softmax_cross_entropy_loss(labels, tf.concat(logits_all, 1),
                                                        weights=tf.concat(weights_all, 1))
        weights = tf.concat(box_w, 1)
        squared = tf.reduce_sum(tf.square(tf.concat(box_p, 1) - tf.stop_gradient(tf.concat(box_t, 1))), -1)
        box_loss = kd_losses.weighted_normalized_sum(squared, weights)  # L2 loss, mean over windows
        return {"cls": cls_loss, "box": box_loss}

    # -- inference -------------------------------------------------------------------------------
    def _scale_candidates(self, images, image_shapes, scale, fine_stride=None):
        scaled, shapes = self._scaled(images, image_shapes, scale)
        logits, deltas, windows = self.dense(scaled, fine_stride=fine_stride)
        b = tf.shape(logits)[0]
        probs = tf.nn.softmax(tf.reshape(logits, [b, -1, self.num_classes + 1]))[..., 1:]
        windows = tf.reshape(windows, [-1, 4])
        valid = self._valid_windows(windows, shapes)
        probs = tf.where(valid[..., None], probs, 0.0)
        k = min(self.top_k_classes, self.num_classes)
        top = tf.math.top_k(tf.reduce_max(probs, 1), k).indices  # C_s, [B, k]
        in_top = tf.reduce_any(tf.equal(top[:, None, :], tf.range(self.num_classes)[None, :, None]), -1)
        scores = tf.where(in_top[:, None, :], probs, 0.0)  # [B, N, K]
        boxes = self._boxes(deltas, windows)
        if not self.class_specific_regressor:
            boxes = tf.tile(boxes[:, :, None], [1, 1, self.num_classes, 1])
        factor = shapes / tf.maximum(image_shapes, 1.0)  # back to network-input pixels
        boxes = boxes / tf.tile(factor[:, ::-1], [1, 2])[:, None, None, :]
        classes = tf.broadcast_to(tf.range(self.num_classes)[None, None], tf.shape(scores))
        return tf.reshape(boxes, [b, -1, 4]), tf.reshape(scores, [b, -1]), tf.reshape(classes, [b, -1])

    def detect(self, images, image_shapes, training=False, scales=None, fine_stride=None):
        """Detections of section 4.3; `scales` / `fine_stride` override the model's (the protocols
        of table 2, see `protocol`)."""
        image_shapes = tf.cast(image_shapes, tf.float32)
        scales = self.scales if scales is None else tuple(_scale_setting(s, "scales") for s in scales)
        parts = [self._scale_candidates(images, image_shapes, s, fine_stride) for s in scales]
        boxes = tf.concat([p[0] for p in parts], 1)
        scores = tf.concat([p[1] for p in parts], 1)
        classes = tf.concat([p[2] for p in parts], 1)
        k = tf.minimum(self.max_merge_boxes, tf.shape(scores)[1])
        top = tf.math.top_k(scores, k)
        scores = top.values
        boxes = tf.gather(boxes, top.indices, batch_dims=1)
        classes = tf.gather(classes, top.indices, batch_dims=1)
        valid = scores >= self.score_threshold

        def merge(args):
            bx, sc, cl, va = args
            mb, ms, alive = of_ops.greedy_merge(bx, sc, cl, va, self.merge_threshold)
            return mb, tf.where(alive, ms, -1.0)

        merged, merged_scores = tf.map_fn(merge, (boxes, scores, classes, valid),
                                          fn_output_signature=(tf.float32, tf.float32))
        k_out = tf.minimum(self.max_detections, tf.shape(merged_scores)[1])
        top = tf.math.top_k(merged_scores, k_out)
        keep = top.values > 0
        out_boxes = clip_boxes(tf.gather(merged, top.indices, batch_dims=1), image_shapes)
        pad = self.max_detections - k_out
        return {
            "boxes": tf.pad(tf.where(keep[..., None], out_boxes, 0.0), [[0, 0], [0, pad], [0, 0]]),
            "scores": tf.pad(tf.where(keep, top.values, 0.0), [[0, 0], [0, pad]]),
            "classes": tf.pad(tf.where(keep, tf.gather(classes, top.indices, batch_dims=1), -1),
                              [[0, 0], [0, pad]], constant_values=-1),
            "num_detections": tf.reduce_sum(tf.cast(keep, tf.int32), 1),
        }

    def classify(self, images, scales=None, flips=None, fine_stride=None):
        """[B, K] class scores of section 3.3: per class the spatial max of the softmax at each scale
        and flip, then the mean over scales and flips (background excluded). Images: [B, H, W, 3]
        0..255 without padding."""
        images = self.input_images(images)
        shapes = tf.tile(tf.cast(tf.shape(images)[1:3], tf.float32)[None], [tf.shape(images)[0], 1])
        views = []
        scales = self.scales if scales is None else tuple(_scale_setting(s, "scales") for s in scales)
        for scale in scales:
            scaled, _ = self._scaled(images, shapes, scale)
            for flip in ((False, True) if (self.flips if flips is None else flips) else (False,)):
                x = tf.reverse(scaled, [2]) if flip else scaled
                logits, _, _ = self.dense(x, fine_stride=fine_stride)
                probs = tf.nn.softmax(logits)[..., 1:]
                views.append(tf.reduce_max(probs, axis=[1, 2]))
        return tf.add_n(views) / float(len(views))

    def get_config(self):
        config = super().get_config()
        def plain(value):  # JSON-friendly: tuples (also nested exact sizes) become lists
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        config.update(num_classes=self.num_classes, **{k: plain(v) for k, v in self.settings.items()})
        return config
