"""The post-hoc stages R-CNN and SPP-net share: per-class linear SVMs on a region's fc7 features and
class-specific ridge box regression on its pool5 features (kerasdet.heads.region_svms), trained
after the network's fine-tuning by a pass (or a few, for hard negative mining) over the training
images, and applied in the graph at test time.

A detector using them provides `proposal_reader(batch)` -> (proposals, valid), the settings
`nms_iou`, `score_threshold`, `max_detections`, `pre_nms_top_k`,
`region_features(images, rois, valid, image_shapes, training=False)` -> (svm features [B, R, D],
box features [B, R, D5], logits [B, R, K + 1]) and `region_feature_dims()` -> (D, D5); `build`,
`detect` and `call` come from here. The learned values live in non-trainable variables, so save_weights / load_weights and
SavedModel export carry them. Until `fit_region_stages` has run, `region_scores` falls back to the
fine-tuned network's softmax (flag `svms_trained`), and no box correction is applied.
"""
import time

import keras
import numpy as np
import tensorflow as tf

from kerasdet import ops
from kerasdet.heads import region_svms
from kerasdet.heads.proposals import ExternalProposals
from kerasdet.models.base import batch_image_shapes, ground_truth

__all__ = ["RegionStages"]


class RegionStages:
    """Mixin for a Detector (see the module docstring)."""

    def build_region_stages(self, svm_dim, box_dim):
        k = self.num_classes

        def weight(name, shape, value=0.0):
            # float32 under a mixed policy too (autocast=False): margins and box deltas are
            # linear maps of float32 features, read outside the network's half-precision layers
            return self.add_weight(name=name, shape=shape, dtype="float32", trainable=False,
                                   initializer=keras.initializers.Constant(value), autocast=False)

        self.svm_weights = weight("svm_weights", (int(svm_dim), k))
        self.svm_bias = weight("svm_bias", (k,), -1.0)
        self.svm_feature_scale = weight("svm_feature_scale", (), 1.0)
        self.svms_trained = weight("svms_trained", (), 0.0)
        self.box_weights_matrix = weight("box_regression_weights", (int(box_dim), 4 * k))
        self.box_bias = weight("box_regression_bias", (4 * k,))
        self.box_feature_scale = weight("box_feature_scale", (), 1.0)

    def build(self, input_shape=None):
        """Creates the network's weights (one call on a blank image and one proposal) and the
        stages' variables, sized by `region_feature_dims()` -> (svm dim, box dim)."""
        if self.built:
            return
        with self.distribute_strategy.scope():
            self.build_region_stages(*self.region_feature_dims())
            self.call(ExternalProposals.example_inputs(tf.zeros([1, 64, 64, 3], self.compute_dtype)))
        self.built = True

    # -- test time ------------------------------------------------------------------------------
    def svm_margins(self, svm_features):
        x = tf.cast(svm_features, tf.float32) * self.svm_feature_scale
        return tf.linalg.matmul(x, self.svm_weights) + self.svm_bias

    def region_scores(self, svm_features, logits):
        """[..., K] scores in (0, 1): the sigmoid of the SVM margins once the SVMs are trained (a
        monotone map for ranking and NMS, margin 0 -> 0.5; not a calibrated probability), else the
        fine-tuned classifier's softmax without its background column."""
        softmax = tf.nn.softmax(tf.cast(logits, tf.float32))[..., 1:]
        return tf.where(self.svms_trained > 0.5, tf.sigmoid(self.svm_margins(svm_features)), softmax)

    def region_deltas(self, box_features):
        """[..., K, 4] appendix-C deltas (t_x, t_y, t_w, t_h) per class (zero before training)."""
        x = tf.cast(box_features, tf.float32) * self.box_feature_scale
        out = tf.linalg.matmul(x, self.box_weights_matrix) + self.box_bias
        return tf.reshape(out, tf.concat([tf.shape(out)[:-1], [self.num_classes, 4]], 0))

    def detect(self, images, image_shapes, training=False, inputs=None):
        """R-CNN's test time: every (proposal, class) pair scored, greedy per-class NMS at
        `nms_iou` on the unregressed proposals (the paper's order), then the kept boxes moved by
        their class's regressor and clipped. The predict dict, padded to `max_detections`."""
        proposals, valid = self.proposal_reader(inputs)
        image_shapes = tf.cast(image_shapes, tf.float32)
        svm_features, box_features, logits = self.region_features(images, proposals, valid, image_shapes,
                                                                  training)
        scores = self.region_scores(svm_features, logits) * tf.cast(valid, tf.float32)[..., None]
        deltas = self.region_deltas(box_features)  # [B, P, K, 4]
        b, p, k = tf.shape(scores)[0], tf.shape(scores)[1], self.num_classes
        pair_boxes = tf.reshape(tf.tile(proposals[:, :, None], [1, 1, k, 1]), [b, -1, 4])
        pair_classes = tf.reshape(tf.broadcast_to(tf.range(k)[None, None], [b, p, k]), [b, -1])
        pairs = ops.batched_nms_padded(pair_boxes, tf.reshape(scores, [b, -1]), pair_classes,
                                       self.nms_iou, self.max_detections,
                                       score_threshold=self.score_threshold,
                                       pre_nms_top_k=self.pre_nms_top_k)
        live = pairs["indices"] >= 0
        safe = tf.maximum(pairs["indices"], 0)
        kept_boxes = tf.gather(pair_boxes, safe, batch_dims=1)
        kept_deltas = tf.gather(tf.reshape(deltas, [b, -1, 4]), safe, batch_dims=1)
        moved = ops.clip_boxes(ops.decode_boxes(kept_deltas, kept_boxes, weights=(1.0, 1.0, 1.0, 1.0)),
                               image_shapes)
        return {"boxes": tf.where(live[..., None], moved, 0.0), "scores": pairs["scores"],
                "classes": pairs["classes"], "num_detections": pairs["num_detections"]}

    def call(self, inputs, training=False):
        images = self.input_images(inputs)
        return self.detect(images, batch_image_shapes(inputs, images), training=training, inputs=inputs)

    # -- training (eager, after fine-tuning) ----------------------------------------------------
    def fit_region_stages(self, dataset, svm=None, ridge=None, say=print, max_images=None):
        """Trains the SVMs (hard negative mining over `svm.rounds` passes) and the ridge box
        regressors (settings: kerasdet.heads.region_svms.SVMSettings / RidgeSettings) on the batches of `dataset` (training images with their proposals, no
        augmentation). Returns a summary dict (examples, cache sizes, seconds)."""
        # the model's own settings (its `svm` / `ridge` arguments) unless the call gives others
        svm = svm or getattr(self, "svm_settings", None) or region_svms.SVMSettings()
        ridge = ridge or getattr(self, "ridge_settings", None) or region_svms.RidgeSettings()
        self.build()
        extract = tf.function(self._features_with_ground_truth, reduce_retracing=True)
        k = self.num_classes
        start = time.perf_counter()
        cache = region_svms.HardNegativeCache(k)
        positives = [dict() for _ in range(k)]
        box_x, box_y, box_c = [], [], []
        w = np.zeros((self.svm_weights.shape[0], k))
        b = np.zeros(k)  # the zero model scores every negative 0 > -1: the first pass takes them all
        scale = None
        summary = {"rounds": []}
        rng = np.random.default_rng(0)
        for round_index in range(max(1, svm.rounds)):
            added = 0
            images_seen = 0
            for batch in dataset:
                if max_images is not None and images_seen >= max_images:
                    break
                out = extract(batch)
                feats, boxes_f, rois, n_gt, valid = (v.numpy() for v in out[:5])
                gt_boxes, gt_labels = (v.numpy() for v in out[5:])
                for i in range(len(feats)):
                    if max_images is not None and images_seen >= max_images:
                        break
                    images_seen += 1
                    real = gt_labels[i] >= 0
                    gt_b, gt_l = gt_boxes[i][real], gt_labels[i][real]
                    props = np.flatnonzero(valid[i, n_gt:]) + n_gt
                    pos, neg = region_svms.svm_examples(rois[i, props], gt_b, gt_l, k, svm.negative_iou)
                    gt_rows = np.flatnonzero(real)
                    if scale is None:
                        scale = region_svms.feature_scale(feats[i, valid[i]], svm.feature_norm)
                        box_scale = region_svms.feature_scale(boxes_f[i, valid[i]], ridge.feature_norm)
                    x = feats[i] * scale
                    for c in range(k):
                        if round_index == 0:
                            for j in pos[c]:
                                positives[c][(images_seen, j)] = x[gt_rows[j]]
                        rows = props[neg[c]]
                        if not len(rows):
                            continue
                        margins = x[rows] @ w[:, c] + b[c]
                        hard = rows[margins > svm.hard_threshold]
                        if len(hard) > svm.max_negatives_per_image:
                            # the hardest first; at round 0 (all margins equal) a random subset
                            order = (rng.permutation(len(hard)) if round_index == 0
                                     else np.argsort(-(x[hard] @ w[:, c]), kind="stable"))
                            hard = hard[order[:svm.max_negatives_per_image]]
                        before = len(cache.rows[c])
                        cache.add(c, [(images_seen, int(r)) for r in hard], x[hard])
                        added += len(cache.rows[c]) - before
                    if round_index == 0:
                        idx, cls, targets = region_svms.regression_pairs(rois[i, props], gt_b, gt_l, ridge.min_iou)
                        box_x.append(boxes_f[i, props[idx]] * box_scale)
                        box_y.append(targets)
                        box_c.append(cls)
            evicted = 0
            for c in range(k):
                pos_rows = np.stack(list(positives[c].values())) if positives[c] else np.zeros((0, w.shape[0]))
                w[:, c], b[c] = region_svms.fit_linear_svm(pos_rows, cache.matrix(c, w.shape[0]), svm)
                evicted += cache.evict(c, w[:, c], b[c], svm.evict_threshold)
            summary["rounds"].append({"round": round_index + 1, "hard_negatives_added": int(added),
                                      "evicted": int(evicted), "cache": len(cache)})
            say(f"SVM round {round_index + 1}/{svm.rounds}: {added} hard negatives added, {evicted} "
                f"easy ones evicted, cache {len(cache)}, positives "
                f"{[len(p) for p in positives]}")
        if scale is None:
            raise ValueError("fit_region_stages: the data set gave no images")
        self.svm_weights.assign(w.astype(np.float32))
        self.svm_bias.assign(b.astype(np.float32))
        self.svm_feature_scale.assign(np.float32(scale))
        self.svms_trained.assign(1.0)
        # ridge regression per class
        bx = np.concatenate(box_x) if box_x else np.zeros((0, self.box_weights_matrix.shape[0]))
        by = np.concatenate(box_y) if box_y else np.zeros((0, 4))
        bc = np.concatenate(box_c) if box_c else np.zeros(0, np.int64)
        weights = np.zeros(self.box_weights_matrix.shape, np.float32)
        bias = np.zeros(self.box_bias.shape, np.float32)
        pairs = []
        for c in range(k):
            fitted = region_svms.fit_ridge(bx[bc == c], by[bc == c], ridge.lam)
            pairs.append(int((bc == c).sum()))
            if fitted is not None:
                weights[:, 4 * c:4 * c + 4], bias[4 * c:4 * c + 4] = fitted
        self.box_weights_matrix.assign(weights)
        self.box_bias.assign(bias)
        self.box_feature_scale.assign(np.float32(box_scale))
        summary.update(positives=[len(p) for p in positives], regression_pairs=pairs,
                       seconds=time.perf_counter() - start)
        say(f"box regression: {pairs} pairs per class (IoU > {ridge.min_iou}, lambda {ridge.lam:g}); "
            f"post-hoc stages took {summary['seconds']:.0f} s")
        return summary

    def _features_with_ground_truth(self, batch):
        """Features of [ground truth; proposals] per image: (svm features, box features, rois,
        number of ground-truth rows, valid, gt boxes, gt labels)."""
        images = self.input_images(batch)
        shapes = batch_image_shapes(batch, images)
        gt_boxes, gt_labels = ground_truth(batch)
        proposals, valid = self.proposal_reader(batch)
        rois = tf.concat([tf.cast(gt_boxes, tf.float32), proposals], axis=1)
        valid = tf.concat([gt_labels >= 0, valid], axis=1)
        svm_f, box_f, _ = self.region_features(images, rois, valid, shapes)
        return svm_f, box_f, rois, tf.shape(gt_boxes)[1], valid, gt_boxes, gt_labels
