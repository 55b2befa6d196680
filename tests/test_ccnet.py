"""CC-Net (issue #14): the chaining formulas, the context RoI source, the cascade loss with
rejection and the test-time early rejection against numpy references written from the
definitions; gradients; the detector's contract (fit / predict / export / .keras); learning."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import losses as kd_losses
from kerasdet.heads.chained_cascade import (ChainScale, ContextRoIExtractor, chain_features,
                                            chain_scores, scale_boxes_about_centre)
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.models.ccnet import CCNet
from detector_checks import check_predict_on_mixed_sizes, check_train_step_without_objects
from learning import fit_and_evaluate, tiny_fpn_settings


# -- numpy references ----------------------------------------------------------------------------
def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_pass_map(probs, labels, bp_map, threshold, keep_ratio, positive_quota, negative_quota):
    """SoftmaxWithCascadeLoss's bp_map_out, one image at a time: counted RoIs whose probability
    of their own label is below the threshold; if fewer than ceil(keep_ratio * quota) positives
    (negatives) pass, the rejected ones with the lowest own-label probability are added back."""
    out = np.zeros(labels.shape, np.float32)
    for b in range(labels.shape[0]):
        counted = (bp_map[b] > 0) & (labels[b] >= 0)
        own = probs[b, np.arange(labels.shape[1]), np.maximum(labels[b], 0)]
        out[b] = counted & (own < threshold)
        for group, quota in ((labels[b] >= 1, positive_quota), (labels[b] == 0, negative_quota)):
            candidates = np.flatnonzero(counted & group)
            need = min(math.ceil(keep_ratio * quota), len(candidates))
            passing = candidates[own[candidates] < threshold]
            if len(passing) < need:
                rejected = candidates[own[candidates] >= threshold]
                hardest = rejected[np.argsort(own[rejected], kind="stable")]
                out[b, hardest[: need - len(passing)]] = 1.0
    return out


def np_cascade_loss(labels, logits, bp_map):
    """Mean over the counted RoIs of -log softmax(logits)[label], and its gradient."""
    probs = np_softmax(logits.astype(np.float64))
    counted = (bp_map > 0) & (labels >= 0)
    n = counted.sum()
    picked = np.take_along_axis(probs, np.maximum(labels, 0)[..., None], -1)[..., 0]
    loss = -np.log(picked)[counted].sum() / max(n, 1)
    onehot = np.eye(logits.shape[-1])[np.maximum(labels, 0)]
    grad = np.where(counted[..., None], (probs - onehot) / max(n, 1), 0.0)
    return loss, grad


def random_case(rng, batch=2, rois=40, classes=4, scale=3.0):
    logits = rng.normal(0, scale, [batch, rois, classes + 1]).astype(np.float32)
    labels = np.where(rng.uniform(size=[batch, rois]) < 0.3,
                      rng.integers(1, classes + 1, [batch, rois]), 0).astype(np.int32)
    labels[:, -3:] = -1  # unused sampler slots
    bp_map = (rng.uniform(size=[batch, rois]) < 0.8).astype(np.float32)
    return logits, labels, bp_map


def tiny_ccnet(**overrides):
    settings = tiny_fpn_settings()
    settings.update(overrides)
    return CCNet(3, **settings)


def one_object_batch():
    return {"images": tf.random.uniform([2, 64, 64, 3], 0, 255, seed=3),
            "bounding_boxes": {"boxes": tf.constant([[[4.0, 6.0, 30.0, 40.0], [0, 0, 0, 0]],
                                                     [[10.0, 12.0, 58.0, 50.0],
                                                      [30.0, 2.0, 60.0, 20.0]]]),
                               "labels": tf.constant([[0, -1], [2, 1]], tf.int32)}}


# -- context RoI source ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1.5, 2.7])
def test_context_boxes_keep_the_centre_and_scale_the_sides(scale):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, [2, 5, 2])
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, [2, 5, 2])], -1).astype(np.float32)
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    expected = np.stack([cx - scale * w / 2, cy - scale * h / 2, cx + scale * w / 2,
                         cy + scale * h / 2], -1)
    np.testing.assert_allclose(scale_boxes_about_centre(boxes, scale).numpy(), expected,
                               rtol=1e-5, atol=1e-4)
    theoretical, numerical = tf.test.compute_gradient(
        lambda b: scale_boxes_about_centre(b, scale), [tf.constant(boxes[0], tf.float64)])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)


def test_context_extractor_pools_the_enlarged_box():
    features = tf.random.uniform([1, 16, 16, 8], seed=1)
    rois = tf.constant([[[10.0, 12.0, 30.0, 40.0], [20.0, 20.0, 36.0, 28.0]]])
    enlarged = tf.constant([[[5.0, 5.0, 35.0, 47.0], [16.0, 18.0, 40.0, 30.0]]])
    context = ContextRoIExtractor(7, context_scale=1.5, strides=(4,))
    plain = RoIExtractor(7, strides=(4,))
    np.testing.assert_allclose(context(features, rois).numpy(), plain(features, enlarged).numpy(),
                               atol=1e-6)
    assert ContextRoIExtractor.from_config(context.get_config()).context_scale == 1.5


# -- chaining ---------------------------------------------------------------------------------------
def test_feature_and_score_chaining_match_the_formulas_and_their_gradients():
    rng = np.random.default_rng(1)
    outputs = [rng.normal(size=[2, 5, 6]).astype(np.float32) for _ in range(4)]
    scores = [rng.normal(size=[2, 5, 4]).astype(np.float32) for _ in range(4)]
    alphas = [None] + [ChainScale() for _ in range(3)]
    betas = [ChainScale(dtype="float32") for _ in range(4)]
    alpha_values, beta_values = [None], []
    for a in alphas[1:]:
        a.build((None, 6))
        alpha_values.append(rng.uniform(0.5, 2.0, 6).astype(np.float32))
        a.scale.assign(alpha_values[-1])
    for b in betas:
        b.build((None, 4))
        beta_values.append(rng.uniform(0.5, 2.0, 4).astype(np.float32))
        b.scale.assign(beta_values[-1])
    h = [outputs[0]]
    for t in range(1, 4):
        h.append(h[-1] + alpha_values[t] * outputs[t])
    c = [beta_values[0] * scores[0]]
    for t in range(1, 4):
        c.append(c[-1] + beta_values[t] * scores[t])
    for got, want in zip(chain_features(outputs, alphas), h):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    for got, want in zip(chain_scores(scores, betas), c):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    # the scales start at exactly 1
    fresh = ChainScale()
    fresh.build((None, 3))
    np.testing.assert_array_equal(fresh.scale.numpy(), np.ones(3))

    # gradients of the last chained score with respect to every beta and the features' alphas
    proj = tf.constant(rng.normal(size=[6, 4]), tf.float64)

    def last_score(*betas_and_alphas):
        bs, als = betas_and_alphas[:4], betas_and_alphas[4:]
        hidden = chain_features([tf.constant(o, tf.float64) for o in outputs],
                                [None] + [lambda x, a=a: x * a for a in als])
        fs = [tf.constant(s, tf.float64) + tf.einsum("brd,dk->brk", hh, proj)
              for s, hh in zip(scores, hidden)]
        return chain_scores(fs, [lambda x, b=b: x * b for b in bs])[-1]

    args = [tf.constant(v, tf.float64) for v in beta_values + alpha_values[1:]]
    theoretical, numerical = tf.test.compute_gradient(last_score, args)
    for a, n in zip(theoretical, numerical):
        np.testing.assert_allclose(a, n, rtol=1e-5, atol=1e-6)


# -- cascade loss with rejection -------------------------------------------------------------------
@pytest.mark.parametrize("threshold, keep_ratio", [(0.9, 0.1), (0.5, 0.1), (0.2, 0.3),
                                                   (0.99, 0.0), (0.05, 1.0)])
def test_pass_map_matches_the_rejection_rule(threshold, keep_ratio):
    rng = np.random.default_rng(int(threshold * 100))
    logits, labels, bp_map = random_case(rng)
    probs = np_softmax(logits)
    got = kd_losses.cascade_pass_map(probs, labels, bp_map, threshold, keep_ratio, 10, 30).numpy()
    want = np_pass_map(probs, labels, bp_map, threshold, keep_ratio, 10, 30)
    np.testing.assert_array_equal(got, want)
    assert np.all(got <= bp_map)  # a RoI once rejected never comes back


def test_pass_map_keeps_the_hardest_quota_when_every_roi_is_easy():
    labels = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, -1]], np.int32)
    own = np.array([0.95, 0.99, 0.97, 0.999, 0.999, 0.98, 0.995, 0.97, 0.99, 0.999, 0.0])
    probs = np.zeros([1, 11, 3], np.float32)
    probs[0, np.arange(11), np.maximum(labels[0], 0)] = own
    bp = np.ones([1, 11], np.float32)
    # quotas 4 / 10 at keep_ratio 0.5: none passes 0.9, so the 2 least confident positives
    # (0.95, 0.97) and the 5 least confident negatives (0.97, 0.98, 0.99, 0.995, and of the two at
    # 0.999 the first) stay; the unused slot never does.
    got = kd_losses.cascade_pass_map(probs, labels, bp, 0.9, 0.5, 4, 10).numpy()[0]
    assert list(np.flatnonzero(got)) == [0, 2, 4, 5, 6, 7, 8]
    # with one positive below the threshold, one more (the hardest rejected) is added
    probs[0, 3, 1] = 0.5
    got = kd_losses.cascade_pass_map(probs, labels, bp, 0.9, 0.5, 4, 10).numpy()[0]
    assert list(np.flatnonzero(got[:4])) == [0, 3]


def test_cascade_loss_and_gradient_count_only_the_rois_in_the_cascade():
    rng = np.random.default_rng(3)
    logits, labels, bp_map = random_case(rng)
    want_loss, want_grad = np_cascade_loss(labels, logits, bp_map)
    x = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = kd_losses.cascade_softmax_loss(labels, x, bp_map)
    grad = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)
    assert np.all(grad[bp_map == 0] == 0.0)  # rejected RoIs: exactly zero gradient
    theoretical, numerical = tf.test.compute_gradient(
        lambda z: kd_losses.cascade_softmax_loss(labels, z, bp_map),
        [tf.constant(logits, tf.float64)])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    # nobody left: 0, not NaN
    assert float(kd_losses.cascade_softmax_loss(labels, x, np.zeros_like(bp_map))) == 0.0


def test_training_stages_hand_on_the_pass_maps_of_the_rejection_rule():
    model = tiny_ccnet(stage_thresholds=(0.9, 0.4, 0.4, 0.9), keep_ratio=0.1)
    chain = model.chain
    for layer in (model.stage2_cls_score, model.stage3_cls_score):  # spread the probabilities
        layer.build((None, 256))
        layer.kernel.assign(tf.random.normal(layer.kernel.shape, stddev=0.2, seed=5))
    context = model.first_stage(one_object_batch(), training=True)
    sampled = model.sample_training_rois(context)
    losses, bp_maps = chain.losses(context["roi_features"], sampled, *model.quotas)
    scores, _ = chain.forward(context["roi_features"], sampled["rois"])
    labels = sampled["labels"].numpy()
    np.testing.assert_array_equal(bp_maps[0], labels >= 0)
    np.testing.assert_array_equal(bp_maps[1], bp_maps[0])  # stage 1 does not reject
    expected = bp_maps[1].numpy()
    for t in (1, 2):
        expected = np_pass_map(np_softmax(scores[t].numpy()), labels, expected,
                               chain.thresholds[t], 0.1, *model.quotas)
        np.testing.assert_array_equal(bp_maps[t + 1], expected)
    assert 0 < bp_maps[3].numpy().sum() < bp_maps[0].numpy().sum()
    # Each stage's loss is the sum over the RoIs it counts divided by the sampled RoIs
    # (loss_normalize="sampled"; np_cascade_loss is the mean over the counted ones).
    sampled_count = bp_maps[0].numpy().sum()
    for t in range(4):
        loss, _ = np_cascade_loss(labels, scores[t].numpy(), bp_maps[t].numpy())
        counted = bp_maps[t].numpy().sum()
        np.testing.assert_allclose(float(losses[f"stage{t + 1}_cls"]),
                                   chain.loss_weights[t] * loss * counted / sampled_count,
                                   rtol=1e-4)
    # "passing": the mean over the RoIs the stage counts
    chain.normalize = "passing"
    losses, _ = chain.losses(context["roi_features"], sampled, *model.quotas)
    loss, _ = np_cascade_loss(labels, scores[3].numpy(), bp_maps[3].numpy())
    np.testing.assert_allclose(float(losses["stage4_cls"]), chain.loss_weights[3] * loss,
                               rtol=1e-4)


# -- test-time early rejection ---------------------------------------------------------------------
def _spread_model(**overrides):
    """A tiny CC-Net whose classifiers give RoI-dependent probabilities, thresholds at the medians
    of the dense background probabilities of stages 2 and 3 (so about half are rejected twice)."""
    model = tiny_ccnet(rpn_post_nms_top_k_test=60, **overrides)
    images = tf.random.uniform([2, 64, 64, 3], 0, 255, seed=4)
    shapes = tf.constant([[64.0, 64.0], [48.0, 64.0]])
    roi_features, proposals, valid = model.first_stage_inference(images, shapes)
    chain = model.chain
    for t in range(4):
        layer = getattr(model, f"stage{t + 1}_cls_score")
        layer.build((None, 256))
        layer.kernel.assign(tf.random.normal(layer.kernel.shape, stddev=0.3, seed=10 + t))
    scores, _ = chain.forward(roi_features, proposals)
    background = [np_softmax(s.numpy())[..., 0] for s in scores]
    chain.thresholds = (0.9, float(np.median(background[1])), float(np.median(background[2])),
                        0.9)
    return model, chain, roi_features, proposals, valid, scores


def test_early_rejection_equals_masking_and_runs_later_stages_on_survivors_only():
    model, chain, roi_features, proposals, valid, dense = _spread_model()
    seen = []
    head3 = chain.heads[2]
    chain.heads[2] = lambda pooled, training=False: (seen.append(pooled.shape[1]),
                                                     head3(pooled, training=training))[1]
    early = chain.infer(roi_features, proposals, valid, early_rejection=True)
    masked = chain.infer(roi_features, proposals, valid, early_rejection=False)
    chain.heads[2] = head3
    for a, b in zip(early, masked):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   atol=2e-5)
    probs, alive = early[0].numpy(), early[2].numpy()
    num = proposals.shape[1]
    assert seen[0] < num and seen[1] == num  # gathered survivors vs every RoI
    assert 0 < alive.sum() < valid.numpy().sum()
    # numpy reference of the semantics: rejected after stage 2 keep softmax(c_2), after stage 3
    # softmax(c_3), the survivors softmax(c_4)
    bg = [np_softmax(s.numpy())[..., 0] for s in dense]
    after2 = valid.numpy() & (bg[1] <= chain.thresholds[1])
    after3 = after2 & (bg[2] <= chain.thresholds[2])
    expected = np.where(~after2[..., None], np_softmax(dense[1].numpy()),
                        np.where(~after3[..., None], np_softmax(dense[2].numpy()),
                                 np_softmax(dense[3].numpy())))
    np.testing.assert_allclose(probs, expected, atol=2e-5)
    np.testing.assert_array_equal(alive, after3)


def test_gating_multiplies_by_the_sigmoid_of_the_other_stage():
    model = tiny_ccnet(gating=((0, 1), (1, 3), (3, 2)), rpn_post_nms_top_k_test=20)
    chain = model.chain
    images = tf.random.uniform([1, 64, 64, 3], 0, 255, seed=4)
    roi_features, proposals, valid = model.first_stage_inference(images, tf.constant([[64.0,
                                                                                       64.0]]))
    o = [chain.stage_features(t, roi_features, proposals).numpy() for t in range(4)]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    gated = [o[0] * sig(o[1]), o[1] * sig(o[3]), o[2], o[3] * sig(o[2])]
    h = np.cumsum(np.stack(gated), axis=0)  # alphas start at 1
    scores, _ = chain.forward(roi_features, proposals)
    w, b = model.stage4_cls_score.kernel.numpy(), model.stage4_cls_score.bias.numpy()
    c4 = sum(h[t] @ getattr(model, f"stage{t + 1}_cls_score").kernel.numpy() +
             getattr(model, f"stage{t + 1}_cls_score").bias.numpy() for t in range(4))
    assert w.shape == (256, 4) and b.shape == (4,)
    np.testing.assert_allclose(scores[-1].numpy(), c4, rtol=1e-3, atol=1e-4)


# -- the detector ----------------------------------------------------------------------------------
def test_ccnet_learns_the_synthetic_shapes(synthetic_data):
    # 64 RoIs per image (the reference's batch: 16 positives, 48 negatives) halves the four heads'
    # cost against the tiny FPN settings' 128.
    model = tiny_ccnet(roi_batch_size=64)
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=EPOCHS)
    print(f"CC-Net tiny FPN: held-out VOC mAP@0.5 {results['voc']['mAP']:.3f} after {EPOCHS} "
          f"epochs ({seconds:.0f} s)")
    assert np.isfinite(history["loss"][-1]) and history["loss"][-1] < history["loss"][0]
    assert results["voc"]["mAP"] > MAP_BAR


EPOCHS = 4
# Measured 0.663 after 4 epochs (0.403 after 3, too early to hold a useful bar) with each stage's
# loss divided by the sampled RoIs; 0.428 before, when it was divided by the RoIs that pass. The
# bar leaves room for other machines' numerics.
MAP_BAR = 0.55


@pytest.fixture(scope="module")
def shared_ccnet():
    """One small CC-Net for the contract tests (mixed sizes, training without objects, .keras,
    export): building and tracing a detector is most of their time, so they share one (narrower
    than the learning settings, which these tests do not need). Low thresholds at stages 2 and 3
    so test-time early rejection takes part; box regression from h_T, the non-default branch."""
    return tiny_ccnet(fpn_channels=16, fc_dim=64, score_threshold=0.0, box_from="last",
                      rpn_pre_nms_top_k_test=100, rpn_post_nms_top_k_test=50,
                      stage_thresholds=(0.9, 0.3, 0.3, 0.9))


def test_predict_on_mixed_sizes_and_a_batch_without_objects(shared_ccnet):
    check_predict_on_mixed_sizes(shared_ccnet)
    logs = check_train_step_without_objects(shared_ccnet, box_losses=("rpn_box", "box"))
    assert set(logs) >= set(shared_ccnet.loss_names)


def test_external_proposals_single_map_two_levels_train_and_predict():
    from kerasdet.models.fast_rcnn import jittered_proposals

    model = CCNet(3, backbone="tiny", fpn=False, feature="C4", fc_dim=64, proposals="external",
                  stage_features=("C4", "C4", "C3", "C3"), roi_batch_size=32, score_threshold=0.0,
                  seed=0)
    assert model.loss_names == ("stage1_cls", "stage2_cls", "stage3_cls", "stage4_cls", "box")
    batch = one_object_batch()
    batch["proposals"] = jittered_proposals(batch["bounding_boxes"]["boxes"],
                                            batch["bounding_boxes"]["labels"],
                                            tf.constant([[64.0, 64.0]] * 2), 40, seed=1)
    model.compile(optimizer="sgd")
    logs = model.train_on_batch(batch, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    out = model.predict_on_batch({"images": batch["images"], "proposals": batch["proposals"]})
    assert out["boxes"].shape == (2, 100, 4) and out["num_detections"].sum() > 0
    assert model.stage3_roi_extractor.strides == (model.backbone.strides["C3"],)


def test_config_and_keras_file_round_trip_give_the_same_detections(shared_ccnet, tmp_path):
    model = shared_ccnet
    images = np.random.default_rng(2).uniform(0, 255, [1, 64, 64, 3]).astype(np.float32)
    reference = model.predict_on_batch({"images": images})
    clone = CCNet.from_config(model.get_config())
    assert clone.ccnet_config == model.ccnet_config
    path = str(tmp_path / "ccnet.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.chain.box_from == "last" and restored.chain.thresholds == model.chain.thresholds
    out = restored.predict_on_batch({"images": images})
    assert reference["num_detections"][0] > 0
    np.testing.assert_allclose(out["scores"], reference["scores"], atol=1e-5)
    np.testing.assert_allclose(out["boxes"], reference["boxes"], atol=1e-3)


def test_export_matches_predict_with_early_rejection(shared_ccnet, tmp_path):
    from kerasdet.export import export_saved_model

    model = shared_ccnet
    if not model.built:  # run alone
        model.build((1, 64, 64, 3))
    path = str(tmp_path / "ccnet")
    export_saved_model(model, path, portable=False, image_size=(64, 64))
    images = np.random.default_rng(8).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    reference = {k: v.numpy() for k, v in model(images.astype(np.float32)).items()}
    n = int(out["num_detections"][0])
    assert n == int(reference["num_detections"][0]) > 0
    np.testing.assert_allclose(out["detection_scores"].numpy()[0, :n], reference["scores"][0, :n],
                               rtol=1e-3, atol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stage_thresholds"):
        tiny_ccnet(stage_thresholds=(0.9, 0.9))
    with pytest.raises(ValueError, match="loss_normalize"):
        tiny_ccnet(loss_normalize="counted")
    with pytest.raises(ValueError, match="box_from"):
        tiny_ccnet(box_from="middle")
    with pytest.raises(ValueError, match="gating"):
        tiny_ccnet(gating=((0, 7),))
    with pytest.raises(ValueError, match="roi_ohem"):
        tiny_ccnet(roi_ohem=True)
