import math

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.heads.cascade import (CASCADE_BOX_WEIGHTS, CASCADE_IOUS, mean_class_probabilities,
                                    refine_boxes, relabel_rois, scale_gradient)
from kerasdet.models.cascade_rcnn import CascadeRCNN
from kerasdet.models.faster_rcnn import FasterRCNN
from detector_checks import check_predict_on_mixed_sizes, check_train_step_without_objects
from learning import fit_and_evaluate, tiny_fpn_settings


# -- numpy references written from the papers' definitions --------------------------------------
def np_iou(a, b):
    """IoU of boxes a [R, 4] with b [N, 4], continuous (x1, y1, x2, y2) coordinates."""
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def np_stage_labels(rois, valid, gt_boxes, gt_labels, u):
    """Cascade R-CNN's y^t: the class (+1) of the best ground truth when IoU >= u, else 0
    (background); -1 for invalid RoIs. One image."""
    keep = gt_labels >= 0
    labels = np.full(len(rois), -1, np.int64)
    if not keep.any():
        labels[valid] = 0
        return labels
    iou = np_iou(rois, gt_boxes[keep])
    best = iou.argmax(1)
    fg = iou.max(1) >= u
    labels[:] = np.where(fg, gt_labels[keep][best] + 1, 0)
    labels[~valid] = -1
    return labels


def np_decode(deltas, rois, weights, clip=math.log(1000.0 / 16.0)):
    """R-CNN box decoding: deltas (dx, dy, dw, dh) divided by the coder weights, applied to the
    RoI's centre and size."""
    wx, wy, ww, wh = weights
    w = rois[:, 2] - rois[:, 0]
    h = rois[:, 3] - rois[:, 1]
    cx = rois[:, 0] + 0.5 * w
    cy = rois[:, 1] + 0.5 * h
    pcx = deltas[:, 0] / wx * w + cx
    pcy = deltas[:, 1] / wy * h + cy
    pw = np.exp(np.minimum(deltas[:, 2] / ww, clip)) * w
    ph = np.exp(np.minimum(deltas[:, 3] / wh, clip)) * h
    return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], axis=1)


def np_clip(boxes, height, width):
    out = boxes.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def random_boxes(rng, n, size=100.0, min_side=4.0):
    xy = rng.uniform(0, size * 0.7, [n, 2])
    wh = rng.uniform(min_side, size * 0.5, [n, 2])
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def jitter(rng, boxes, scale):
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    noise = rng.normal(0, scale, boxes.shape) * np.stack([w, h, w, h], 1)
    return (boxes + noise).astype(np.float32)


def tiny_cascade(mode="cascade", **overrides):
    settings = tiny_fpn_settings()
    settings.update(overrides)
    return CascadeRCNN(3, mode=mode, **settings)


def one_object_batch():
    return {"images": tf.random.uniform([2, 64, 64, 3], 0, 255, seed=3),
            "bounding_boxes": {"boxes": tf.constant([[[4.0, 6.0, 30.0, 40.0], [0, 0, 0, 0]],
                                                     [[10.0, 12.0, 58.0, 50.0],
                                                      [30.0, 2.0, 60.0, 20.0]]]),
                               "labels": tf.constant([[0, -1], [2, 1]], tf.int32)}}


# -- stage parts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("u", CASCADE_IOUS)
def test_relabel_rois_matches_numpy_labels_at_each_stage_threshold(u):
    rng = np.random.default_rng(0)
    gt = np.stack([random_boxes(rng, 3), random_boxes(rng, 3)])
    gt_labels = np.array([[0, 2, -1], [1, -1, -1]], np.int32)
    # RoIs around the ground truth at several qualities so every threshold splits them.
    rois = np.stack([jitter(rng, np.repeat(gt[b], 20, 0), 0.12) for b in range(2)])
    valid = rng.uniform(size=rois.shape[:2]) > 0.1
    out = relabel_rois(rois, valid, gt, gt_labels, u, add_ground_truth=True)
    for b in range(2):
        all_rois = np.concatenate([rois[b], gt[b]])
        all_valid = np.concatenate([valid[b], gt_labels[b] >= 0])
        expected = np_stage_labels(all_rois, all_valid, gt[b], gt_labels[b], u)
        np.testing.assert_array_equal(out["labels"][b].numpy(), expected)
        fg = expected > 0
        keep = gt_labels[b] >= 0
        best = np_iou(all_rois, gt[b][keep]).argmax(1)
        np.testing.assert_allclose(out["matched_boxes"][b].numpy()[fg], gt[b][keep][best][fg])
    # The thresholds matter: some RoIs are foreground at 0.5 but not at 0.7.
    at_05 = relabel_rois(rois, valid, gt, gt_labels, 0.5)["labels"].numpy()
    at_07 = relabel_rois(rois, valid, gt, gt_labels, 0.7)["labels"].numpy()
    assert (at_05 > 0).sum() > (at_07 > 0).sum() > 0


def test_relabel_rois_without_ground_truth_makes_everything_background():
    rois = random_boxes(np.random.default_rng(1), 5)[None]
    out = relabel_rois(rois, np.ones([1, 5], bool), np.zeros([1, 1, 4], np.float32),
                       -np.ones([1, 1], np.int32), 0.6, add_ground_truth=True)
    np.testing.assert_array_equal(out["labels"].numpy(), [[0, 0, 0, 0, 0, -1]])


def test_relabel_rois_rejects_a_bad_threshold_and_shape():
    with pytest.raises(ValueError, match="iou_threshold"):
        relabel_rois(np.zeros([1, 2, 4]), np.ones([1, 2], bool), np.zeros([1, 1, 4]),
                     np.zeros([1, 1], np.int32), 1.5)
    with pytest.raises(ValueError, match="rois"):
        relabel_rois(np.zeros([2, 4]), np.ones([2], bool), np.zeros([1, 1, 4]),
                     np.zeros([1, 1], np.int32), 0.5)


@pytest.mark.parametrize("weights", CASCADE_BOX_WEIGHTS)
def test_refine_boxes_decodes_with_the_stage_weights_clips_and_stops_the_gradient(weights):
    rng = np.random.default_rng(2)
    rois = random_boxes(rng, 6, size=60.0)[None]
    deltas = tf.constant(rng.normal(0, 2.0, [1, 6, 1, 4]).astype(np.float32))
    shapes = tf.constant([[50.0, 70.0]])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(deltas)
        boxes, nonempty = refine_boxes(deltas, rois, shapes, weights)
        unstopped = tf.reduce_sum(boxes * 1.0) + tf.reduce_sum(deltas)
    expected = np_clip(np_decode(deltas.numpy()[0, :, 0], rois[0], weights), 50.0, 70.0)
    np.testing.assert_allclose(boxes.numpy()[0], expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(
        nonempty.numpy()[0], (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1]))
    assert tape.gradient(boxes, deltas) is None
    # Only the explicit deltas term reaches the deltas: no gradient through the boxes.
    np.testing.assert_allclose(tape.gradient(unstopped, deltas).numpy(), 1.0)


def test_refine_boxes_rejects_class_specific_deltas():
    with pytest.raises(ValueError, match="class-agnostic"):
        refine_boxes(np.zeros([1, 2, 3, 4], np.float32), np.zeros([1, 2, 4], np.float32),
                     np.ones([1, 2], np.float32), (10, 10, 5, 5))


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = tf.constant(np.random.default_rng(3).normal(size=[2, 5]).astype(np.float32))
    upstream = tf.constant(np.random.default_rng(4).normal(size=[2, 5]).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = scale_gradient(x, 1.0 / 3.0)
        scaled = tf.reduce_sum(y * upstream)
        plain = tf.reduce_sum(x * upstream)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(scaled, x).numpy(),
                               tape.gradient(plain, x).numpy() / 3.0, rtol=1e-6)


def test_mean_class_probabilities_is_the_mean_of_the_stage_softmaxes():
    rng = np.random.default_rng(5)
    logits = [rng.normal(0, 3, [2, 7, 4]).astype(np.float32) for _ in range(3)]
    expected = np.mean([np_softmax(x) for x in logits], axis=0)
    np.testing.assert_allclose(mean_class_probabilities(logits).numpy(), expected, rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(ValueError, match="stage_logits"):
        mean_class_probabilities([])


# -- the model's use of the parts -----------------------------------------------------------------
def _features_and_targets(model, batch):
    from kerasdet.heads.roi_sampler import sample_rois
    from kerasdet.models.base import ground_truth

    images = tf.cast(batch["images"], tf.float32)
    shapes = tf.constant([[64.0, 64.0]] * 2)
    _, roi_features = model.features(images)
    gt_boxes, gt_labels = ground_truth(batch)
    rng = np.random.default_rng(6)
    proposals = np.stack([jitter(rng, np.repeat(gt_boxes.numpy()[b][:2], 12, 0), 0.15)
                          for b in range(2)])
    proposals = np_clip(proposals.reshape(-1, 4), 64, 64).reshape(2, -1, 4)
    sampled = sample_rois(tf.constant(proposals), tf.ones([2, 24], tf.bool), gt_boxes, gt_labels,
                          num_samples=16, positive_fraction=0.5, seed=0)
    return roi_features, sampled, gt_boxes, gt_labels, shapes


def test_training_stages_use_the_previous_stage_boxes_their_thresholds_and_weights():
    model = tiny_cascade()
    batch = one_object_batch()
    roi_features, sampled, gt_boxes, gt_labels, shapes = _features_and_targets(model, batch)
    stages = model.stage_targets(roi_features, sampled, gt_boxes, gt_labels, shapes)
    assert len(stages) == 3
    for t in range(1, 3):
        prev_targets, _, prev_deltas = stages[t - 1]
        targets = stages[t][0]
        for b in range(2):
            refined = np_clip(np_decode(prev_deltas.numpy()[b, :, 0],
                                        prev_targets["rois"].numpy()[b],
                                        CASCADE_BOX_WEIGHTS[t - 1]), 64, 64)
            valid = ((prev_targets["labels"].numpy()[b] >= 0) & (refined[:, 2] > refined[:, 0])
                     & (refined[:, 3] > refined[:, 1]))
            gt = gt_boxes.numpy()[b]
            labels = gt_labels.numpy()[b]
            all_rois = np.concatenate([refined, gt])  # ground truth appended again
            all_valid = np.concatenate([valid, labels >= 0])
            np.testing.assert_allclose(targets["rois"].numpy()[b], all_rois, rtol=1e-5, atol=1e-3)
            np.testing.assert_array_equal(
                targets["labels"].numpy()[b],
                np_stage_labels(all_rois, all_valid, gt, labels, CASCADE_IOUS[t]))


def test_stage_losses_use_each_stage_box_weights():
    from kerasdet import ops

    model = tiny_cascade()
    batch = one_object_batch()
    roi_features, sampled, gt_boxes, gt_labels, shapes = _features_and_targets(model, batch)
    stages = model.stage_targets(roi_features, sampled, gt_boxes, gt_labels, shapes)
    losses, _ = model.cascade_losses(roi_features, sampled, gt_boxes, gt_labels, shapes)
    for t, (targets, _, deltas) in enumerate(stages):
        labels = targets["labels"].numpy()
        enc = ops.encode_boxes(targets["matched_boxes"], targets["rois"],
                               weights=CASCADE_BOX_WEIGHTS[t]).numpy()
        diff = np.abs(deltas.numpy()[:, :, 0] - enc)
        smooth = np.where(diff < 1.0, 0.5 * diff ** 2, diff - 0.5).sum(-1)
        expected = (smooth * (labels > 0)).sum() / (labels >= 0).sum()
        np.testing.assert_allclose(losses[f"stage{t + 1}_box"].numpy(), expected, rtol=1e-4)


def test_each_stage_gradient_into_the_trunk_features_is_scaled_by_one_third():
    model = tiny_cascade()
    batch = one_object_batch()
    roi_features, sampled, *_ = _features_and_targets(model, batch)
    rois = sampled["rois"]
    weights = tf.random.stateless_normal([2, 16, 4], seed=[1, 2])

    def feature_gradients(scale):
        model.gradient_scale = scale
        with tf.GradientTape() as tape:
            tape.watch(roi_features)
            total = 0.0
            for t in range(3):
                logits, _ = model.stage_head(model.pool(roi_features, rois), t)
                total += tf.reduce_sum(logits * weights)
        return tape.gradient(total, roi_features)

    assert model.gradient_scale == pytest.approx(1.0 / 3.0)
    scaled = feature_gradients(1.0 / 3.0)
    unscaled = feature_gradients(1.0)
    norm = sum(float(tf.reduce_sum(tf.abs(g))) for g in unscaled)
    assert norm > 0
    for s, u in zip(scaled, unscaled):
        np.testing.assert_allclose(s.numpy(), u.numpy() / 3.0, rtol=1e-4, atol=1e-9)


def test_later_stage_losses_send_no_gradient_to_earlier_regressors():
    model = tiny_cascade()
    batch = one_object_batch()
    roi_features, sampled, gt_boxes, gt_labels, shapes = _features_and_targets(model, batch)
    with tf.GradientTape(persistent=True) as tape:
        stages = model.stage_targets(roi_features, sampled, gt_boxes, gt_labels, shapes)
        losses, _ = model.cascade_losses(roi_features, sampled, gt_boxes, gt_labels, shapes)
        later = losses["stage2_cls"] + losses["stage2_box"] + losses["stage3_cls"] + \
            losses["stage3_box"]
        first = losses["stage1_box"]
    stage1_box = model.stage_predictors[0].box.kernel
    assert tape.gradient(later, stage1_box) is None
    assert float(tf.reduce_sum(tf.abs(tape.gradient(first, stage1_box)))) > 0
    assert tape.gradient(stages[1][0]["rois"], stages[0][2]) is None
    assert tape.gradient(stages[2][0]["rois"], stages[1][2]) is None


def test_test_time_score_is_the_mean_of_the_stage_classifiers_on_the_last_stage_boxes():
    model = tiny_cascade()
    batch = one_object_batch()
    roi_features, sampled, *_ = _features_and_targets(model, batch)
    proposals = sampled["rois"]
    shapes = tf.constant([[64.0, 48.0], [60.0, 64.0]])
    probs, deltas, rois, weights = model.refine(roi_features, proposals, shapes)
    assert weights == CASCADE_BOX_WEIGHTS[2]
    # numpy reference: chain the first two stages' regressions, then average all three
    # classifiers' softmax on the last stage's input boxes.
    boxes = proposals.numpy()
    for t in range(2):
        _, d = model.stage_head(model.pool(roi_features, tf.constant(boxes)), t)
        boxes = np.stack([np_clip(np_decode(d.numpy()[b, :, 0], boxes[b], CASCADE_BOX_WEIGHTS[t]),
                                  *shapes.numpy()[b]) for b in range(2)])
    np.testing.assert_allclose(rois.numpy(), boxes, rtol=1e-5, atol=1e-3)
    pooled = model.pool(roi_features, rois)
    heads = [model.stage_head(pooled, t) for t in range(3)]
    expected = np.mean([np_softmax(logits.numpy()) for logits, _ in heads], axis=0)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deltas.numpy(), heads[2][1].numpy(), rtol=1e-6)
    # The stages differ, so the ensemble is not any single stage's output.
    assert not np.allclose(expected, np_softmax(heads[2][0].numpy()), atol=1e-4)


def test_integral_mode_labels_one_roi_set_at_three_thresholds():
    model = tiny_cascade("integral")
    batch = one_object_batch()
    roi_features, sampled, gt_boxes, gt_labels, _ = _features_and_targets(model, batch)
    losses, _ = model.integral_losses(roi_features, sampled, gt_boxes, gt_labels)
    logits, _ = model._integral_logits(model.pool(roi_features, sampled["rois"]))
    assert len(logits) == 3
    for t, u in enumerate(CASCADE_IOUS):
        total, count = 0.0, 0
        for b in range(2):
            labels = np_stage_labels(sampled["rois"].numpy()[b],
                                     sampled["labels"].numpy()[b] >= 0, gt_boxes.numpy()[b],
                                     gt_labels.numpy()[b], u)
            logp = np.log(np_softmax(logits[t].numpy()[b]))
            keep = labels >= 0
            total += -logp[keep, labels[keep]].sum()
            count += keep.sum()
        np.testing.assert_allclose(losses[f"stage{t + 1}_cls"].numpy(), total / count, rtol=1e-4)


def test_iterative_mode_applies_one_head_three_times():
    model = tiny_cascade("iterative")
    batch = one_object_batch()
    roi_features, sampled, *_ = _features_and_targets(model, batch)
    shapes = tf.constant([[64.0, 64.0]] * 2)
    probs, deltas, rois, weights = model.refine(roi_features, sampled["rois"], shapes)
    assert len(model.stage_heads) == len(model.stage_predictors) == 1
    boxes = sampled["rois"].numpy()
    for _ in range(2):
        _, d = model.stage_head(model.pool(roi_features, tf.constant(boxes)), 0)
        boxes = np.stack([np_clip(np_decode(d.numpy()[b, :, 0], boxes[b], CASCADE_BOX_WEIGHTS[0]),
                                  64, 64) for b in range(2)])
    np.testing.assert_allclose(rois.numpy(), boxes, rtol=1e-5, atol=1e-3)
    assert weights == CASCADE_BOX_WEIGHTS[0]


# -- whole models ---------------------------------------------------------------------------------
def test_cascade_rcnn_learns_the_synthetic_shapes(synthetic_data):
    model = tiny_cascade()
    history, results, seconds = fit_and_evaluate(model, synthetic_data, epochs=4)
    losses = history["loss"]
    print(f"Cascade R-CNN FPN tiny: mAP@0.5 {results['voc']['mAP']:.3f} after {seconds:.0f}s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, " + ", ".join(
              f"stage{t} cls {history[f'stage{t}_cls'][0]:.3f} -> "
              f"{history[f'stage{t}_cls'][-1]:.3f}" for t in (1, 2, 3)))
    assert losses[-1] < losses[0]
    # The later stages' box losses grow while the first stage improves: its better boxes turn
    # more of the RoIs into foreground at 0.6 / 0.7 (the losses are averaged over all RoIs), so
    # the classifiers and the RPN are what must clearly fall.
    assert history["rpn_cls"][-1] < 0.6 * history["rpn_cls"][0]
    for t in (1, 2, 3):
        assert history[f"stage{t}_cls"][-1] < 0.7 * history[f"stage{t}_cls"][0]
    assert results["voc"]["mAP"] >= 0.5


# (cascade mode's train and predict steps run in the empty-batch and mixed-size tests below)
@pytest.mark.parametrize("mode", ["iterative", "integral"])
def test_each_mode_trains_on_a_batch_and_predicts(mode):
    model = tiny_cascade(mode)
    model.compile(optimizer="sgd")
    logs = model.train_on_batch(one_object_batch(), return_dict=True)
    assert set(logs) == {"loss", *model.loss_names}
    assert all(np.isfinite(v) for v in logs.values())
    # An eager call runs the same detect() as predict without tracing another graph.
    out = model(np.zeros([1, 64, 64, 3], np.float32))
    assert out["boxes"].shape == (1, 100, 4) and out["classes"].dtype == tf.int32


def test_predict_on_mixed_sizes_and_empty_images():
    check_predict_on_mixed_sizes(tiny_cascade())


def test_train_step_handles_a_batch_without_objects():
    check_train_step_without_objects(
        tiny_cascade(), box_losses=("rpn_box", "stage1_box", "stage2_box", "stage3_box"))


@pytest.mark.parametrize("mode, with_masks", [("cascade", True), ("iterative", False),
                                              ("integral", False)])
def test_config_round_trip_rebuilds_the_same_model(mode, with_masks):
    model = tiny_cascade(mode, stage_loss_weights=(1.0, 0.5, 0.25), with_masks=with_masks,
                         mask_channels=8)
    model.build()
    config = model.get_config()
    clone = CascadeRCNN.from_config(config)
    clone.build()
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    assert clone.loss_names == model.loss_names


def test_keras_file_round_trip_gives_the_same_detections(tmp_path):
    import keras

    model = tiny_cascade(score_threshold=0.0, rpn_pre_nms_top_k_test=100,
                         rpn_post_nms_top_k_test=50)
    model.build((1, 64, 64, 3))
    path = str(tmp_path / "cascade.keras")
    model.save(path)
    clone = keras.saving.load_model(path)
    assert isinstance(clone, CascadeRCNN) and clone.get_config() == model.get_config()
    images = np.random.default_rng(9).uniform(0, 255, [1, 64, 64, 3]).astype(np.float32)
    a, b = model(images), clone(images)  # eager: no graphs to trace
    assert int(a["num_detections"][0]) > 0
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), atol=1e-5, err_msg=key)


def test_parameter_count_is_faster_rcnn_plus_two_stage_heads():
    # Cascade = a class-agnostic FPN Faster R-CNN + (T - 1) more 2fc heads and predictors.
    settings = tiny_fpn_settings()
    faster = FasterRCNN(3, class_agnostic=True, **settings)
    faster.build()
    cascade = tiny_cascade()
    cascade.build()
    pooled = 7 * 7 * settings["fpn_channels"]
    fc = settings["fc_dim"]
    head = (pooled * fc + fc) + (fc * fc + fc)
    predictor = (fc * 4 + 4) + (fc * 4 + 4)  # 3 + 1 class logits, 4 class-agnostic deltas
    assert cascade.count_params() == faster.count_params() + 2 * (head + predictor)
    integral = tiny_cascade("integral")
    integral.build()
    assert integral.count_params() == faster.count_params() + 2 * (fc * 4 + 4)
    iterative = tiny_cascade("iterative")
    iterative.build()
    assert iterative.count_params() == faster.count_params()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        tiny_cascade("boosted")
    with pytest.raises(ValueError, match="stage_box_weights"):
        tiny_cascade(stage_box_weights=CASCADE_BOX_WEIGHTS[:2])
    with pytest.raises(ValueError, match="stage_loss_weights"):
        tiny_cascade(stage_loss_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="fpn"):
        tiny_cascade(fpn=False)
    with pytest.raises(ValueError, match="box_weights"):
        tiny_cascade(box_weights=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="roi_foreground_iou"):
        tiny_cascade(roi_foreground_iou=0.6)
    with pytest.raises(ValueError, match="stage_ious"):
        tiny_cascade(stage_ious=(0.5, 1.2, 0.7))


# -- Cascade Mask R-CNN ---------------------------------------------------------------------------
def one_object_masks():
    masks = np.zeros([2, 2, 64, 64], np.uint8)
    masks[0, 0, 8:38, 6:28] = 1
    masks[1, 0, 14:48, 12:56] = 1
    masks[1, 1, 3:19, 32:58] = 1
    # The pipeline's layout: each mask as a grid over its box.
    from kerasdet.data.mask_grids import crop_masks_to_boxes

    boxes = one_object_batch()["bounding_boxes"]["boxes"]
    return np.stack([crop_masks_to_boxes(m, b, 28).numpy() for m, b in zip(masks, boxes)])


def test_mask_loss_uses_the_last_stage_foreground_rois():
    model = tiny_cascade(with_masks=True, mask_channels=8, mask_rois_per_image=6)
    batch = one_object_batch()
    roi_features, sampled, gt_boxes, gt_labels, shapes = _features_and_targets(model, batch)
    _, last = model.cascade_losses(roi_features, sampled, gt_boxes, gt_labels, shapes)
    masks = one_object_masks()
    gt_boxes = batch["bounding_boxes"]["boxes"].numpy()
    loss = model.mask_loss(roi_features, last, masks, gt_boxes).numpy()
    # numpy reference: the first (up to) 6 foreground RoIs of each image at IoU >= 0.7, the
    # sigmoid cross entropy of their class's channel against the matched mask cropped to the RoI.
    from kerasdet.heads.mask_head import mask_targets

    labels = last["labels"].numpy()
    per_roi = []
    for b in range(2):
        fg = np.flatnonzero(labels[b] > 0)[:6]
        assert len(fg) > 0
        rois = tf.constant(last["rois"].numpy()[b][fg][None])
        targets = mask_targets(masks[b:b + 1], gt_boxes[b:b + 1], rois,
                               last["matched_index"].numpy()[b][fg][None], 28).numpy()[0]
        features_b = [f[b:b + 1] for f in roi_features]
        logits = model.mask_logits(features_b, rois).numpy()[0]
        for i, r in enumerate(fg):
            z = logits[i, :, :, labels[b, r] - 1]
            bce = np.maximum(z, 0) - z * targets[i] + np.log1p(np.exp(-np.abs(z)))
            per_roi.append(bce.mean())
    np.testing.assert_allclose(loss, np.mean(per_roi), rtol=1e-4)


def test_cascade_mask_rcnn_trains_and_predicts_pasted_masks():
    model = tiny_cascade(with_masks=True, mask_channels=8)
    model.compile(optimizer="sgd")
    batch = dict(one_object_batch(), masks=tf.constant(one_object_masks()))
    logs = model.train_on_batch(batch, return_dict=True)
    assert "mask" in logs and np.isfinite(logs["mask"]) and logs["mask"] > 0
    out = model(np.zeros([1, 64, 96, 3], np.float32))  # eager: no second graph to trace
    assert out["masks"].shape == (1, 100, 64, 96) and out["masks"].dtype == tf.uint8
    n = int(out["num_detections"][0])
    assert not out["masks"].numpy()[0, n:].any()
    with pytest.raises(ValueError, match="masks"):
        model.compute_detection_losses(one_object_batch(), training=True)


def test_cascade_mask_model_exports_to_a_saved_model_that_matches_predict(tmp_path):
    from kerasdet.export import export_saved_model

    model = tiny_cascade(with_masks=True, mask_channels=8, mask_num_convs=1, score_threshold=0.0,
                         rpn_pre_nms_top_k_test=100, rpn_post_nms_top_k_test=50)
    model.build((1, 64, 64, 3))
    path = str(tmp_path / "cascade_mask")
    # The compiled kernels (portable=False): the pure-TF fallback graph of 4 RoI poolings is slow
    # to trace, and tests/test_export.py already covers the portable mode.
    export_saved_model(model, path, portable=False, image_size=(64, 64))
    assert model.paste_masks  # restored after tracing
    images = np.random.default_rng(8).integers(0, 256, size=(1, 64, 64, 3), dtype=np.uint8)
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    reference = {k: v.numpy() for k, v in model(images.astype(np.float32)).items()}
    n = int(out["num_detections"][0])
    assert n == int(reference["num_detections"][0]) > 0
    np.testing.assert_allclose(out["detection_scores"].numpy()[0, :n], reference["scores"][0, :n],
                               rtol=1e-3, atol=1e-4)
    masks = out["detection_masks"].numpy()
    assert masks.shape == (1, 100, 28, 28) and 0.0 <= masks.min() and masks.max() <= 1.0
    assert np.all(masks[0, n:] == 0)
