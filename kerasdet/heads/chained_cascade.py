"""CC-Net's chained cascade (Ouyang et al. 2017, "Learning Chained Deep Features and Classifiers
for Cascade in Object Detection"): T stages on the same RoIs, each with its own RoI source (a
feature level and a context scale), its own head, and classifiers chained across the stages.

    stage t:  o_t = head_t(pool_t(maps_t, context_t(rois)))         (the stage's features)
    features: h_1 = o_1,             h_t = h_{t-1} + alpha_t * o_t   (alpha_t per channel, init 1)
    scores:   c_1 = beta_1 * f_1,    c_t = c_{t-1} + beta_t * f_t    (beta_t per class, init 1)
              f_t = W_t h_t + b_t; stage t's classifier output is c_t (softmax over K + 1)
    boxes:    class-specific deltas from h_1 (the released code) or from h_T.

Training runs every stage on every sampled RoI; rejection is a 0/1 mask passed from stage to
stage (kerasdet.losses.cascade_pass_map / cascade_softmax_loss). At test time a RoI whose
background probability after stage t exceeds that stage's threshold is rejected there: the later
stages run on the survivors only (gathered per image into the front of a [B, M] block, M the
largest survivor count of the batch, and scattered back), and the rejected RoI keeps the scores
of the stage that rejected it. Under XLA, where M cannot be data-dependent, every stage runs on
every RoI and the rejected ones are masked: the same numbers.
"""
import keras
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet import ops
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.ops.xla import in_xla_context

__all__ = ["scale_boxes_about_centre", "ContextRoIExtractor", "ChainScale", "chain_features",
           "chain_scores", "ChainedCascade"]


def scale_boxes_about_centre(boxes, scale):
    """[..., 4] (x1, y1, x2, y2) boxes with their width and height multiplied by `scale`, centre
    kept (the context window of CC-Net's RoI sources). Not clipped: the poolers read the part
    outside the image as the zero-padded feature map, as the reference's pooling does."""
    boxes = tf.convert_to_tensor(boxes)
    if boxes.dtype != tf.float64:  # geometry stays at least float32 (half-precision boxes too)
        boxes = tf.cast(boxes, tf.float32)
    scale = float(scale)
    if scale == 1.0:
        return boxes
    centre = 0.5 * (boxes[..., :2] + boxes[..., 2:])
    half = 0.5 * scale * (boxes[..., 2:] - boxes[..., :2])
    return tf.concat([centre - half, centre + half], axis=-1)


@keras.saving.register_keras_serializable(package="kerasdet")
class ContextRoIExtractor(RoIExtractor):
    """RoIExtractor that pools each RoI enlarged by `context_scale` about its centre (with FPN
    routing, the enlarged box picks its level)."""

    def __init__(self, output_size=7, context_scale=1.0, **kwargs):
        super().__init__(output_size, **kwargs)
        self.context_scale = float(context_scale)
        if self.context_scale <= 0:
            raise ValueError(f"`context_scale` must be > 0, got {context_scale}.")

    def call(self, features, rois):
        return super().call(features, scale_boxes_about_centre(rois, self.context_scale))

    def get_config(self):
        return dict(super().get_config(), context_scale=self.context_scale)


@keras.saving.register_keras_serializable(package="kerasdet")
class ChainScale(keras.layers.Layer):
    """x * s with a learned scale s of shape [channels], initialised to 1 (CC-Net's alpha_t and
    beta_t)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(int(input_shape[-1]),), initializer="ones",
                                     name="scale")

    def call(self, x):
        return x * tf.cast(self.scale, x.dtype)


def chain_features(outputs, alphas=None):
    """[h_1 .. h_T] from the stages' features [o_1 .. o_T]: h_1 = o_1, h_t = h_{t-1} + alpha_t o_t
    (`alphas[t]` a callable, alphas[0] unused; None: plain sums)."""
    chained = [outputs[0]]
    for t in range(1, len(outputs)):
        scaled = outputs[t] if alphas is None else alphas[t](outputs[t])
        chained.append(chained[-1] + scaled)
    return chained


def chain_scores(scores, betas=None):
    """[c_1 .. c_T] from the stages' classifier outputs [f_1 .. f_T]: c_1 = beta_1 f_1,
    c_t = c_{t-1} + beta_t f_t."""
    chained = []
    for t, f in enumerate(scores):
        scaled = f if betas is None else betas[t](f)
        chained.append(scaled if t == 0 else chained[-1] + scaled)
    return chained


def _compact(alive, fixed=False):
    """Per image, the indices of the alive RoIs first: (indices [B, M], slot valid [B, M]), M the
    largest alive count of the batch (at least 1, so the stages never see an empty block);
    `fixed`: M = R (every RoI, the masked form)."""
    num = tf.shape(alive)[1]
    if fixed:
        indices = tf.broadcast_to(tf.range(num)[tf.newaxis], tf.shape(alive))
        return indices, alive
    order = tf.argsort(tf.cast(alive, tf.int32), axis=1, direction="DESCENDING", stable=True)
    count = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(alive, tf.int32), axis=1)), 1)
    indices = order[:, :count]
    return indices, tf.gather(alive, indices, batch_dims=1)


def _scatter(dense, indices, slot_valid, updates):
    """`dense` [B, R, ...] with rows indices[b, m] replaced by updates[b, m] where slot_valid."""
    where = tf.where(slot_valid)  # [N, 2] (b, m)
    target = tf.stack([where[:, 0], tf.cast(tf.gather_nd(indices, where), tf.int64)], axis=1)
    return tf.tensor_scatter_nd_update(dense, target,
                                       tf.cast(tf.gather_nd(updates, where), dense.dtype))


class ChainedCascade:
    """The T chained stages of CC-Net as one box stage of a TwoStageDetector.

    sources[t]: RoI extractor of stage t (a ContextRoIExtractor); feature_keys[t]: the key of the
    detector's RoI feature maps it pools from (None: all of them, e.g. an FPN pyramid); heads[t]:
    pooled [B, R, S, S, C] -> o_t [B, R, D] (the same D for every stage); classifiers[t]: Dense
    K + 1; alphas[t] (t >= 1) / betas[t]: ChainScale layers (None where chaining is off);
    box_predictor: Dense 4 K (class-specific deltas) on h_1 (`box_from="first"`) or h_T ("last").
    gating: pairs (i, j): o_i is replaced by o_i * sigmoid(o_j) before chaining (the reference
    prototxt's A * sigmoid(B), ...); every o_j is the stage's own, ungated. With gating a stage
    needs later stages' features, so at test time all features are computed on all RoIs and
    rejection only freezes the scores.
    thresholds[t], rejects[t]: stage t rejects (training: the RoIs it hands to stage t + 1's loss;
    test: RoIs whose background probability exceeds thresholds[t]); loss_weights[t]: factor on
    stage t's cascade loss; normalize: "sampled" divides each stage's loss by the sampled RoIs,
    "passing" by the RoIs it counts.
    """

    def __init__(self, num_classes, sources, feature_keys, heads, classifiers, alphas, betas,
                 box_predictor, thresholds, rejects, loss_weights, keep_ratio=0.1,
                 rejection=True, test_rejection=True, box_from="first", gating=None,
                 box_weights=(10.0, 10.0, 5.0, 5.0), foreground_iou=0.5, normalize="sampled"):
        self.num_classes = int(num_classes)
        self.sources, self.feature_keys, self.heads = list(sources), list(feature_keys), list(heads)
        self.classifiers, self.alphas, self.betas = list(classifiers), list(alphas), list(betas)
        self.box_predictor = box_predictor
        self.thresholds = tuple(float(t) for t in thresholds)
        self.rejects = tuple(bool(r) for r in rejects)
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.keep_ratio = float(keep_ratio)
        self.rejection, self.test_rejection = bool(rejection), bool(test_rejection)
        self.box_from = box_from
        self.gating = tuple(tuple(int(i) for i in pair) for pair in (gating or ()))
        self.box_weights = tuple(float(w) for w in box_weights)
        self.foreground_iou = float(foreground_iou)
        self.normalize = normalize
        # Chaining is off where the scales are None (the ablation's unchained stages).
        self.feature_chaining = all(a is not None for a in self.alphas[1:])
        self.score_chaining = all(b is not None for b in self.betas)

    @property
    def num_stages(self):
        return len(self.sources)

    @property
    def loss_names(self):
        return tuple(f"stage{t + 1}_cls" for t in range(self.num_stages)) + ("box",)

    # -- the pieces ------------------------------------------------------------------------------
    def stage_features(self, t, roi_features, rois, training=False):
        """o_t [B, R, D] of stage t on [B, R, 4] RoIs."""
        key = self.feature_keys[t]
        maps = roi_features if key is None else roi_features[key]
        return self.heads[t](self.sources[t](maps, rois), training=training)

    def gated(self, outputs):
        gated = list(outputs)
        for i, j in self.gating:
            gated[i] = outputs[i] * tf.sigmoid(outputs[j])
        return gated

    def _alpha(self, t, o):
        return o if self.alphas[t] is None else self.alphas[t](o)

    def _score(self, t, h, training=False):
        f = tf.cast(self.classifiers[t](h, training=training), tf.float32)
        return f if self.betas[t] is None else self.betas[t](f)

    def deltas(self, hidden, training=False):
        """[B, R, D] -> class-specific deltas [B, R, K, 4] float32."""
        deltas = tf.cast(self.box_predictor(hidden, training=training), tf.float32)
        shape = tf.concat([tf.shape(hidden)[:-1], [self.num_classes, 4]], axis=0)
        deltas = tf.reshape(deltas, shape)
        deltas.set_shape(hidden.shape[:-1].concatenate([self.num_classes, 4]))
        return deltas


    # -- training --------------------------------------------------------------------------------
    def forward(self, roi_features, rois, training=False):
        """Every stage on every RoI: ([c_1 .. c_T] float32 [B, R, K + 1], deltas)."""
        outputs = [self.stage_features(t, roi_features, rois, training)
                   for t in range(self.num_stages)]
        outputs = self.gated(outputs)
        hidden = chain_features(outputs, self.alphas) if self.feature_chaining else outputs
        scores = [tf.cast(self.classifiers[t](h, training=training), tf.float32)
                  for t, h in enumerate(hidden)]
        chained = chain_scores(scores, self.betas) if self.score_chaining else scores
        box_hidden = hidden[0] if self.box_from == "first" else hidden[-1]
        return chained, self.deltas(box_hidden, training)

    def losses(self, roi_features, sampled, positive_quota, negative_quota, training=False):
        """Stage t's cascade loss on the RoIs still in the cascade, weighted; the box loss (Fast
        R-CNN's smooth L1 on the foreground, over the sampled RoIs). Also returns the bp_maps
        each stage's loss counted ([B, R] 0/1 per stage)."""
        scores, deltas = self.forward(roi_features, sampled["rois"], training)
        labels = sampled["labels"]
        bp_map = tf.cast(labels >= 0, tf.float32)
        normalizer = None if self.normalize == "passing" else tf.reduce_sum(bp_map)
        losses, bp_maps = {}, []
        for t, c in enumerate(scores):
            bp_maps.append(bp_map)
            losses[f"stage{t + 1}_cls"] = self.loss_weights[t] * kd_losses.cascade_softmax_loss(
                labels, c, bp_map, normalizer)
            if self.rejection and self.rejects[t] and t + 1 < self.num_stages:
                bp_map = kd_losses.cascade_pass_map(tf.nn.softmax(c), labels, bp_map,
                                                    self.thresholds[t], self.keep_ratio,
                                                    positive_quota, negative_quota)
        targets = tf.stop_gradient(ops.encode_boxes(sampled["matched_boxes"], sampled["rois"],
                                                    weights=self.box_weights))
        own = kd_losses.select_class_boxes(deltas, labels - 1)
        losses["box"] = kd_losses.smooth_l1_loss(
            targets, own, 1.0, tf.cast(labels >= 1, tf.float32),
            tf.reduce_sum(tf.cast(labels >= 0, tf.float32)))
        return losses, bp_maps

    # -- inference -------------------------------------------------------------------------------
    def infer(self, roi_features, rois, valid, training=False, early_rejection=None):
        """(class probabilities [B, R, K + 1] float32, deltas [B, R, K, 4], alive [B, R]).

        early_rejection: None = `test_rejection`; True runs stage t > 1 on the RoIs alive after
        stage t - 1 only (gathered), False runs every stage on every RoI and masks (the same
        numbers, the reference the tests compare to)."""
        if early_rejection is None:
            early_rejection = self.test_rejection
        fixed = (not early_rejection) or bool(self.gating) or in_xla_context()
        rois = tf.cast(rois, tf.float32)
        alive = tf.cast(valid, tf.bool)
        precomputed = None
        if self.gating:
            precomputed = self.gated([self.stage_features(t, roi_features, rois, training)
                                      for t in range(self.num_stages)])
        hidden = scores = first_hidden = None
        for t in range(self.num_stages):
            if t == 0:
                indices, slot_valid = _compact(alive, fixed=True)
            else:
                indices, slot_valid = _compact(alive, fixed=fixed)
            if precomputed is not None:
                o = tf.gather(precomputed[t], indices, batch_dims=1)
            else:
                o = self.stage_features(t, roi_features, tf.gather(rois, indices, batch_dims=1),
                                        training)
            h = o
            if t > 0 and self.feature_chaining:
                h = tf.gather(hidden, indices, batch_dims=1) + self._alpha(t, o)
            c = self._score(t, h, training)
            if t > 0 and self.score_chaining:
                c = tf.gather(scores, indices, batch_dims=1) + c
            if t == 0:
                hidden, scores, first_hidden = h, c, h
            elif fixed:
                hidden = tf.where(slot_valid[..., tf.newaxis], tf.cast(h, hidden.dtype), hidden)
                scores = tf.where(slot_valid[..., tf.newaxis], c, scores)
            else:
                hidden = _scatter(hidden, indices, slot_valid, h)
                scores = _scatter(scores, indices, slot_valid, c)
            if self.rejects[t] and t + 1 < self.num_stages:
                background = tf.nn.softmax(scores)[..., 0]
                alive = alive & (background <= self.thresholds[t])
        box_hidden = first_hidden if self.box_from == "first" else hidden
        return tf.nn.softmax(scores), self.deltas(box_hidden, training), alive

    def __call__(self, roi_features, rois, training=False):
        """(the last stage's logits c_T, deltas) on every RoI (the BoxStage interface)."""
        scores, deltas = self.forward(roi_features, rois, training)
        return scores[-1], deltas
