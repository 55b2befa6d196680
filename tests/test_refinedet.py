"""RefineDet (issue #13): numpy references written from the paper's definitions (refined-anchor
decoding, ODM matching against refined anchors, the negative anchor filter, the combined loss with
per-module positive counts, the inference filter and post-processing), gradient checks, the
Detector API on a tiny configuration, and the full-size models built (anchor and parameter counts).
"""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from detector_checks import check_predict_on_mixed_sizes, check_train_step_without_objects
from kerasdet.heads.single_shot import match_to_anchors, negative_anchor_mask, single_shot_targets
from kerasdet.models.refinedet import RefineDet, refined_anchors

VARIANCES = np.array([0.1, 0.1, 0.2, 0.2])


def tiny_refinedet(**overrides):
    settings = dict(backbone="tiny", tcb_channels=32, max_detections=100, seed=0)
    settings.update(overrides)
    return RefineDet(3, **settings)


# -- numpy references, written from the definitions -------------------------------------------------
def np_center(b):
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return b[..., 0] + w / 2, b[..., 1] + h / 2, w, h


def np_decode(deltas, anchors):
    """Centre-size decoding with variances (0.1, 0.1, 0.2, 0.2)."""
    ax, ay, aw, ah = np_center(anchors)
    d = deltas * VARIANCES
    cx, cy = ax + d[..., 0] * aw, ay + d[..., 1] * ah
    w, h = aw * np.exp(d[..., 2]), ah * np.exp(d[..., 3])
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def np_encode(boxes, anchors):
    ax, ay, aw, ah = np_center(anchors)
    bx, by, bw, bh = np_center(boxes)
    return np.stack([(bx - ax) / aw, (by - ay) / ah, np.log(bw / aw), np.log(bh / ah)], -1) / VARIANCES


def np_iou(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def np_match(anchors, gt_boxes, gt_labels, threshold=0.5):
    """One image: each ground truth takes its best anchor; every other anchor with best IoU >= 0.5
    takes its best ground truth. Returns (class targets: label + 1 / 0, matched gt index or -1)."""
    n = len(anchors)
    matched = np.full(n, -1)
    valid = np.flatnonzero(gt_labels >= 0)
    if len(valid):
        iou = np_iou(anchors, gt_boxes[valid])
        best = iou.max(1)
        matched[best >= threshold] = valid[iou.argmax(1)[best >= threshold]]
        for j in range(len(valid) - 1, -1, -1):  # the lowest index wins a shared best anchor
            if iou[:, j].max() > 0:
                matched[iou[:, j].argmax()] = valid[j]
    classes = np.where(matched >= 0, gt_labels[np.maximum(matched, 0)] + 1, 0)
    return classes, matched


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_multibox(class_targets, logits, box_targets, deltas, ratio=3):
    """Softmax CE over positives + hardest negatives (ratio per positive, per image; ignored = -1
    never), smooth L1 over positives, both divided by the batch's number of positives (0 if none)."""
    logp = np.log(np_softmax(logits.astype(np.float64)))
    ce = -np.take_along_axis(logp, np.maximum(class_targets, 0)[..., None], -1)[..., 0]
    total_cls = 0.0
    for b in range(len(ce)):
        pos = class_targets[b] > 0
        neg = np.flatnonzero(class_targets[b] == 0)
        k = min(int(ratio * pos.sum()), len(neg))
        hardest = neg[np.argsort(-ce[b, neg], kind="stable")[:k]]
        total_cls += ce[b, pos].sum() + ce[b, hardest].sum()
    pos = class_targets > 0
    x = np.abs(deltas - box_targets)
    sl1 = np.where(x < 1, 0.5 * x ** 2, x - 0.5).sum(-1)
    n = pos.sum()
    return (0.0, 0.0) if n == 0 else (total_cls / n, sl1[pos].sum() / n)


def np_nms(boxes, scores, iou_threshold):
    order, keep = np.argsort(-scores, kind="stable"), []
    while len(order):
        i = order[0]
        keep.append(i)
        rest = order[1:]
        order = rest[np_iou(boxes[i:i + 1], boxes[rest])[0] <= iou_threshold]
    return keep


def np_detections(boxes, probs, filtered, shape, top_k=400, iou=0.45, keep=200, threshold=0.01,
                  per_class_top_k=None):
    """One image: filter -> clip -> top-k (per image over (box, class), or per class) -> per-class
    NMS -> top `keep` -> scores > threshold. Returns sorted (score, class, box) tuples."""
    scores = np.where(filtered[:, None], 0.0, probs[:, 1:])
    h, w = shape
    boxes = np.stack([np.clip(boxes[:, 0], 0, w), np.clip(boxes[:, 1], 0, h),
                      np.clip(boxes[:, 2], 0, w), np.clip(boxes[:, 3], 0, h)], -1)
    pairs = [(scores[i, c], c, i) for i in range(len(boxes)) for c in range(scores.shape[1])]
    if per_class_top_k is None:
        pairs = sorted(pairs, key=lambda p: -p[0])[:top_k]
    else:
        pairs = [p for c in range(scores.shape[1])
                 for p in sorted([p for p in pairs if p[1] == c], key=lambda p: -p[0])[:per_class_top_k]]
    pairs = [p for p in pairs if p[0] > threshold]
    out = []
    for c in range(scores.shape[1]):
        mine = [p for p in pairs if p[1] == c]
        if mine:
            idx = np.array([p[2] for p in mine])
            for k in np_nms(boxes[idx], np.array([p[0] for p in mine]), iou):
                out.append((mine[k][0], c, boxes[idx[k]]))
    return sorted(out, key=lambda p: -p[0])[:keep]


# -- fixtures of synthetic head outputs ------------------------------------------------------------
def random_outputs(rng, batch=2, anchors_side=6, classes=3):
    """Anchors of a 6 x 6 grid (stride 16, size 32, 3 ratios) and random head outputs."""
    from kerasdet.ops import generate_anchors

    anchors = generate_anchors((anchors_side, anchors_side), 16, (32,), (0.5, 1.0, 2.0)).numpy()
    n = len(anchors)
    return {"anchors": anchors,
            "arm_deltas": rng.normal(0, 1.0, [batch, n, 4]).astype(np.float32),
            "arm_logits": rng.normal(0, 3.0, [batch, n, 2]).astype(np.float32),
            "odm_deltas": rng.normal(0, 1.0, [batch, n, 4]).astype(np.float32),
            "odm_logits": rng.normal(0, 2.0, [batch, n, classes + 1]).astype(np.float32)}


GT_BOXES = np.array([[[10, 12, 50, 60], [40, 30, 90, 70], [0, 0, 0, 0]],
                     [[20, 20, 44, 80], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
GT_LABELS = np.array([[0, 2, -1], [1, -1, -1]], np.int32)


def test_refined_anchors_are_the_anchors_decoded_by_the_arm_offsets_without_gradient():
    out = random_outputs(np.random.default_rng(0))
    deltas = tf.constant(out["arm_deltas"])
    with tf.GradientTape() as tape:
        tape.watch(deltas)
        refined = refined_anchors(out["anchors"], deltas, (10, 10, 5, 5))
        total = tf.reduce_sum(refined)
    np.testing.assert_allclose(refined.numpy(), np_decode(out["arm_deltas"], out["anchors"]),
                               rtol=1e-5, atol=1e-3)
    assert tape.gradient(total, deltas) is None
    # Not clipped: refined anchors may leave the 96 x 96 grid area.
    assert refined.numpy().min() < 0 and refined.numpy().max() > 96


def test_odm_targets_match_and_encode_against_the_refined_anchors():
    out = random_outputs(np.random.default_rng(1))
    out["arm_deltas"] *= 0.5  # refined anchors that still overlap the objects
    refined = np_decode(out["arm_deltas"], out["anchors"])
    classes, boxes, positive = single_shot_targets(refined, GT_BOXES, GT_LABELS, (10, 10, 5, 5))
    for b in range(2):
        want, matched = np_match(refined[b], GT_BOXES[b], GT_LABELS[b])
        np.testing.assert_array_equal(classes.numpy()[b], want)
        np.testing.assert_array_equal(positive.numpy()[b], matched >= 0)
        pos = matched >= 0
        assert pos.sum() >= (GT_LABELS[b] >= 0).sum()  # every object has its best anchor
        np.testing.assert_allclose(boxes.numpy()[b][pos],
                                   np_encode(GT_BOXES[b][matched[pos]], refined[b][pos]),
                                   rtol=1e-4, atol=1e-4)
        assert not boxes.numpy()[b][~pos].any()
    # The ARM's binary targets on the tiled anchors.
    arm, _, _ = single_shot_targets(out["anchors"], GT_BOXES, GT_LABELS, (10, 10, 5, 5), binary=True)
    for b in range(2):
        want, _ = np_match(out["anchors"], GT_BOXES[b], GT_LABELS[b])
        np.testing.assert_array_equal(arm.numpy()[b], (want > 0).astype(np.int32))


def test_best_anchor_of_a_ground_truth_is_positive_below_the_threshold():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 100, 100], [50, 50, 60, 60]], np.float32)
    gt = np.array([[[0, 0, 30, 30]]], np.float32)  # best IoU 0.11 with anchor 0, 0.09 with anchor 1
    matched, positive = match_to_anchors(anchors, gt, np.array([[1]]))
    np.testing.assert_array_equal(positive.numpy(), [[True, False, False]])
    _, positive = match_to_anchors(anchors, np.zeros([1, 0, 4]), np.zeros([1, 0], np.int32))
    assert not positive.numpy().any()


def test_negative_anchor_filter_drops_confident_negatives_but_keeps_positives():
    rng = np.random.default_rng(2)
    out = random_outputs(rng)
    out["arm_deltas"] *= 0.3
    model = tiny_refinedet()
    mask = negative_anchor_mask(out["arm_logits"], 0.99).numpy()
    np.testing.assert_array_equal(mask, np_softmax(out["arm_logits"].astype(np.float64))[..., 0] > 0.99)
    assert 0 < mask.sum() < mask.size
    # Make sure some positives sit on filtered anchors: the rule must keep them.
    refined = np_decode(out["arm_deltas"], out["anchors"])
    positives = [np_match(refined[b], GT_BOXES[b], GT_LABELS[b])[0] > 0 for b in range(2)]
    for b in range(2):
        out["arm_logits"][b, positives[b]] = [8.0, 0.0]  # not-object probability 0.9997
    mask = np_softmax(out["arm_logits"].astype(np.float64))[..., 0] > 0.99
    _, _, odm_cls, _ = model.targets({k: tf.constant(v) for k, v in out.items()}, GT_BOXES, GT_LABELS)
    for b in range(2):
        want, _ = np_match(refined[b], GT_BOXES[b], GT_LABELS[b])
        want = np.where(mask[b] & (want == 0), -1, want)
        np.testing.assert_array_equal(odm_cls.numpy()[b], want)
        assert (want > 0).any() and (mask[b] & (want > 0)).any()
    off = tiny_refinedet(negative_filter_theta=None)
    _, _, odm_off, _ = off.targets({k: tf.constant(v) for k, v in out.items()}, GT_BOXES, GT_LABELS)
    assert (odm_off.numpy() >= 0).all()


def np_refinedet_losses(out, theta=0.99):
    """The four loss terms of the paper's definition, in float64 numpy."""
    refined = np_decode(out["arm_deltas"], out["anchors"])
    filtered = np_softmax(out["arm_logits"].astype(np.float64))[..., 0] > theta
    n = len(out["anchors"])
    arm_cls, odm_cls = np.zeros([2, n], int), np.zeros([2, n], int)
    arm_box, odm_box = np.zeros([2, n, 4]), np.zeros([2, n, 4])
    for b in range(2):
        c, m = np_match(out["anchors"], GT_BOXES[b], GT_LABELS[b])
        arm_cls[b] = c > 0
        arm_box[b][m >= 0] = np_encode(GT_BOXES[b][m[m >= 0]], out["anchors"][m >= 0])
        c, m = np_match(refined[b], GT_BOXES[b], GT_LABELS[b])
        odm_cls[b] = np.where(filtered[b] & (c == 0), -1, c)
        odm_box[b][m >= 0] = np_encode(GT_BOXES[b][m[m >= 0]], refined[b][m >= 0])
    arm = np_multibox(arm_cls, out["arm_logits"], arm_box, out["arm_deltas"])
    odm = np_multibox(odm_cls, out["odm_logits"], odm_box, out["odm_deltas"])
    return arm, odm, (arm_cls > 0).sum(), (odm_cls > 0).sum()


def test_combined_loss_is_each_module_normalized_by_its_own_positives():
    rng = np.random.default_rng(3)
    out = random_outputs(rng)
    out["arm_deltas"] *= 0.3
    # The ARM moves the last (bottom-right) anchor exactly onto the first object: one more ODM
    # positive than ARM positives, so the two normalizers differ.
    out["arm_deltas"][0, -1] = np_encode(GT_BOXES[0, 0], out["anchors"][-1])
    model = tiny_refinedet()
    losses = model.losses_from_outputs({k: tf.constant(v) for k, v in out.items()}, GT_BOXES, GT_LABELS)
    want_arm, want_odm, n_arm, n_odm = np_refinedet_losses(out)
    assert n_arm != n_odm
    np.testing.assert_allclose([losses["arm_cls"], losses["arm_box"]], want_arm, rtol=1e-4)
    np.testing.assert_allclose([losses["odm_cls"], losses["odm_box"]], want_odm, rtol=1e-4)


def test_a_module_without_positives_contributes_zero_not_nan():
    out = random_outputs(np.random.default_rng(4))
    model = tiny_refinedet()
    # Refined anchors moved far away from every object: the ODM has no positive, the ARM has.
    out["arm_deltas"][..., :2] = 60.0
    out["arm_deltas"][..., 2:] = 0.0
    losses = model.losses_from_outputs({k: tf.constant(v) for k, v in out.items()}, GT_BOXES, GT_LABELS)
    assert losses["odm_cls"] == 0.0 and losses["odm_box"] == 0.0
    assert losses["arm_cls"] > 0 and losses["arm_box"] > 0
    none = model.losses_from_outputs({k: tf.constant(v) for k, v in out.items()},
                                     np.zeros([2, 1, 4], np.float32), -np.ones([2, 1], np.int32))
    assert all(float(v) == 0.0 for v in none.values())


def test_loss_gradients_match_finite_differences_and_stop_at_the_refined_anchors():
    rng = np.random.default_rng(5)
    out = random_outputs(rng, anchors_side=4)
    out["arm_deltas"] *= 0.3
    model = tiny_refinedet()
    inputs = {k: tf.constant(v) for k, v in out.items()}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(list(inputs.values()))
        losses = model.losses_from_outputs(inputs, GT_BOXES, GT_LABELS)
        total = tf.add_n(list(losses.values()))
        odm = losses["odm_cls"] + losses["odm_box"]

    def np_total(values):
        arm, odm_terms, _, _ = np_refinedet_losses(values)
        return sum(arm) + sum(odm_terms)

    # Directional finite differences of the float64 numpy definition (central, eps 1e-4). The ARM's
    # offsets are left out: through the refined anchors they move the ODM's targets, which the
    # method treats as constants (checked below).
    for key in ("odm_deltas", "odm_logits", "arm_logits"):
        grad = tape.gradient(total, inputs[key]).numpy()
        for _ in range(3):
            direction = rng.normal(size=out[key].shape)
            up, down = dict(out), dict(out)
            up[key] = out[key].astype(np.float64) + 1e-4 * direction
            down[key] = out[key].astype(np.float64) - 1e-4 * direction
            numeric = (np_total(up) - np_total(down)) / 2e-4
            np.testing.assert_allclose((grad * direction).sum(), numeric, rtol=2e-3, atol=1e-4)
    assert tape.gradient(odm, inputs["arm_deltas"]) is None  # the ODM never reaches the ARM offsets


@pytest.mark.parametrize("per_class_top_k", [None, 5])
def test_inference_filters_decodes_against_refined_anchors_and_keeps_the_top(per_class_top_k):
    rng = np.random.default_rng(6)
    out = random_outputs(rng, batch=2, classes=3)
    out["odm_logits"][..., 0] -= 2.0  # enough foreground scores above 0.01
    settings = dict(pre_nms_top_k=40, max_detections=15)
    if per_class_top_k:
        settings.update(per_class_top_k=per_class_top_k, max_detections=12)
    model = tiny_refinedet(**settings)
    shapes = np.array([[96, 96], [70, 80]], np.float32)
    got = model.detections_from_outputs({k: tf.constant(v) for k, v in out.items()}, shapes)
    refined = np_decode(out["arm_deltas"], out["anchors"])
    boxes = np_decode(out["odm_deltas"], refined)
    filtered = np_softmax(out["arm_logits"].astype(np.float64))[..., 0] > 0.99
    assert filtered.any()
    for b in range(2):
        want = np_detections(boxes[b], np_softmax(out["odm_logits"][b].astype(np.float64)),
                             filtered[b], shapes[b], top_k=40, keep=settings["max_detections"],
                             per_class_top_k=per_class_top_k)
        n = int(got["num_detections"][b])
        assert n == len(want) > 0
        np.testing.assert_allclose(got["scores"][b, :n], [w[0] for w in want], rtol=1e-5)
        np.testing.assert_array_equal(got["classes"][b, :n], [w[1] for w in want])
        np.testing.assert_allclose(got["boxes"][b, :n], np.stack([w[2] for w in want]),
                                   rtol=1e-4, atol=1e-3)


def test_tiny_refinedet_predicts_trains_without_objects_saves_and_exports(tmp_path):
    import keras

    from kerasdet.export import export_saved_model

    model = tiny_refinedet(score_threshold=0.0)
    model.build((1, 96, 160, 3))
    check_predict_on_mixed_sizes(model)
    images = np.random.default_rng(8).uniform(0, 255, [1, 96, 96, 3]).astype(np.float32)
    before = model.predict_on_batch(images)
    path = str(tmp_path / "refinedet.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, RefineDet)
    assert loaded.get_config() == json.loads(json.dumps(model.get_config()))
    after = loaded.predict_on_batch(images)
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_allclose(after[key], before[key], rtol=1e-5, atol=1e-4)

    export_dir = export_saved_model(model, str(tmp_path / "export"), portable=True,
                                    image_size=(96, 96))
    served = tf.saved_model.load(export_dir).signatures["serving_default"](
        images=tf.constant(images.astype(np.uint8)))
    assert int(served["num_detections"][0]) > 0 and os.path.isfile(os.path.join(export_dir,
                                                                                 "saved_model.pb"))
    check_train_step_without_objects(tiny_refinedet(), box_losses=("arm_box", "odm_box"))


def test_constructor_checks_and_layouts():
    with pytest.raises(ValueError, match="has no output"):
        RefineDet(3, backbone="tiny", source_layers=("C3", "C9"))
    with pytest.raises(ValueError, match="l2_norm_scales"):
        RefineDet(3, backbone="tiny", l2_norm_scales=(1.0,))
    model = tiny_refinedet()
    assert model.anchor_generator.strides == (4, 8, 16, 32)
    assert model.anchor_generator.sizes == [(16.0,), (32.0,), (64.0,), (128.0,)]


# -- the full-size models: built only ---------------------------------------------------------------
def _head_parameters(source_channels, num_classes, tcb=256, anchors=3):
    """ARM + TCB + ODM parameters of the reference architecture, from its layer list."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    arm = sum(conv(3, c, anchors * 4) + conv(3, c, anchors * 2) for c in source_channels)
    tcb_params = sum(conv(3, c, tcb) + 2 * conv(3, tcb, tcb) for c in source_channels)
    tcb_params += (len(source_channels) - 1) * conv(2, tcb, tcb)  # the 2x2/2 deconvolutions
    odm = len(source_channels) * (conv(3, tcb, anchors * 4) + conv(3, tcb, anchors * (num_classes + 1)))
    return arm + tcb_params + odm


def test_refinedet_vgg16_at_320_and_512_anchor_and_parameter_counts():
    from kerasdet import zoo

    model = zoo.build("refinedet320_vgg16")
    assert model.num_anchors_for_image((320, 320)) == 6375
    assert model.num_anchors_for_image((512, 512)) == 16320
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    vgg = 14_714_688  # conv1_1 .. conv5_3 of VGG-16
    reduced = conv(3, 512, 1024) + conv(1, 1024, 1024) + conv(1, 1024, 256) + conv(3, 256, 512)
    l2 = 512 + 512
    expected = vgg + reduced + l2 + _head_parameters((512, 512, 1024, 512), 20)
    assert model.count_params() == expected == 34_440_884
    assert model.input_settings["image_size"] == [320, 320]
    gammas = {layer.name: float(np.asarray(layer.gamma)[0]) for layer in model.l2_norms if layer}
    assert gammas == {"conv4_3_norm": 10.0, "conv5_3_norm": 8.0}
    assert zoo.build("refinedet512_vgg16").input_settings["image_size"] == [512, 512]


def test_refinedet_resnet101_anchor_and_parameter_counts_and_res6_init():
    from kerasdet import zoo

    model = zoo.build("refinedet512_r101")
    assert model.num_anchors_for_image((512, 512)) == 16320
    assert model.num_anchors_for_image((320, 320)) == 6375
    # torchvision resnet101 without fc (BN statistics are buffers there): 42,500,160; res6: a
    # bottleneck 2048 -> 128 -> 128 -> 512 with a projection, BN scales and shifts.
    res6 = 2048 * 128 + 9 * 128 * 128 + 128 * 512 + 2048 * 512 + 2 * (128 + 128 + 512 + 512)
    bn_stats = sum(int(np.prod(v.shape)) for v in model.weights
                   if "moving_mean" in v.path or "moving_variance" in v.path)
    expected = 42_500_160 + res6 + _head_parameters((512, 1024, 2048, 512), 20)
    assert model.count_params() - bn_stats == expected
    kernel = np.asarray(model.backbone.get_layer("res6_conv2").kernel)
    assert abs(kernel.std() - 0.01) < 0.001 and abs(kernel.mean()) < 0.001


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_tiny_refinedet_trains_and_predicts_float32_under_a_mixed_policy(policy):
    import keras

    keras.config.set_dtype_policy(policy)
    try:
        model = tiny_refinedet()
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        batch = {"images": tf.random.uniform([2, 64, 64, 3], 0, 255),
                 "bounding_boxes": {"boxes": tf.constant(GT_BOXES[:, :2] * 0.6),
                                    "labels": tf.constant(GT_LABELS[:, :2])}}
        logs = model.train_on_batch(batch, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()) and logs["odm_cls"] > 0
        out = model.predict_on_batch(batch["images"])
        assert out["boxes"].dtype == np.float32 and out["scores"].dtype == np.float32
        assert model.odm_conf.convs[0].compute_dtype == policy.split("_")[1]
    finally:
        keras.config.set_dtype_policy("float32")
