"""kerasdet.ops.boxes against plain-numpy references written from the definitions."""
import math

import numpy as np
import pytest
import tensorflow as tf

from kerasdet import ops
from kerasdet.ops import boxes as B


# ---------------------------------------------------------------- numpy references

def np_area(b):
    return np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)


def np_iou(b1, b2):
    out = np.zeros((len(b1), len(b2)))
    for i, p in enumerate(b1):
        for j, q in enumerate(b2):
            iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
            ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
            inter = iw * ih
            union = np_area(p) + np_area(q) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def np_encode(boxes, anchors, w):
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bx, by = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
    return np.stack([w[0] * (bx - ax) / aw, w[1] * (by - ay) / ah,
                     w[2] * np.log(bw / aw), w[3] * np.log(bh / ah)], -1)


def np_decode(d, anchors, w, clip):
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
    x = d[:, 0] / w[0] * aw + ax
    y = d[:, 1] / w[1] * ah + ay
    bw = np.exp(np.minimum(d[:, 2] / w[2], clip)) * aw
    bh = np.exp(np.minimum(d[:, 3] / w[3], clip)) * ah
    return np.stack([x - bw / 2, y - bh / 2, x + bw / 2, y + bh / 2], -1)


def np_greedy_nms(boxes, scores, iou_threshold, score_threshold=-np.inf):
    """Plain greedy NMS: take the best remaining box, drop all with IoU > threshold."""
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] > score_threshold]
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if np_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= iou_threshold]
    return keep


def np_class_nms(boxes, scores, classes, iou_threshold, max_output, score_threshold=-np.inf):
    keep = []
    for c in np.unique(classes):
        idx = np.nonzero(classes == c)[0]
        keep += [idx[k] for k in np_greedy_nms(boxes[idx], scores[idx], iou_threshold,
                                               score_threshold)]
    keep.sort(key=lambda i: -scores[i])
    return np.array(keep[:max_output], dtype=np.int64)


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# ---------------------------------------------------------------- area, IoU

def test_exported_names():
    for name in ("box_iou", "batched_nms", "encode_boxes", "decode_boxes", "clip_boxes"):
        assert getattr(ops, name) is getattr(B, name)


def test_box_area_matches_numpy_and_inverted_is_zero():
    rng = np.random.default_rng(0)
    b = rng.uniform(-10, 10, (20, 4)).astype(np.float32)
    np.testing.assert_allclose(B.box_area(b).numpy(), np_area(b), rtol=1e-6, atol=1e-6)


def test_box_iou_random_matches_numpy():
    rng = np.random.default_rng(1)
    b1, b2 = random_boxes(rng, 13), random_boxes(rng, 7)
    np.testing.assert_allclose(B.box_iou(b1, b2).numpy(), np_iou(b1, b2), rtol=1e-5, atol=1e-6)


def test_box_iou_hand_values():
    b1 = np.array([[0, 0, 10, 10]], np.float32)
    b2 = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]], np.float32)
    # overlap 50 / union 150; identical; disjoint; contained 25 / 100
    np.testing.assert_allclose(B.box_iou(b1, b2).numpy(), [[1 / 3, 1.0, 0.0, 0.25]], rtol=1e-6)


def test_box_iou_batched_and_broadcast():
    rng = np.random.default_rng(2)
    b1 = np.stack([random_boxes(rng, 5) for _ in range(3)])
    b2 = np.stack([random_boxes(rng, 4) for _ in range(3)])
    out = B.box_iou(b1, b2).numpy()
    assert out.shape == (3, 5, 4)
    for i in range(3):
        np.testing.assert_allclose(out[i], np_iou(b1[i], b2[i]), rtol=1e-5, atol=1e-6)
    shared = B.box_iou(b1, b2[0]).numpy()  # [B, N, 4] x [M, 4]
    for i in range(3):
        np.testing.assert_allclose(shared[i], np_iou(b1[i], b2[0]), rtol=1e-5, atol=1e-6)


def test_box_iou_zero_area_and_empty_give_zero_not_nan():
    b = np.array([[3, 3, 3, 3], [0, 0, 0, 5], [0, 0, 4, 4]], np.float32)
    out = B.box_iou(b, b).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:2], 0.0)
    assert out[2, 2] == 1.0
    assert B.box_iou(np.zeros((0, 4), np.float32), b).shape == (0, 3)


def test_box_iou_exact_for_tiny_normalized_boxes():
    # keras' compute_iou adds 1e-7 to the union; ours must give exactly 1 for identical tiny boxes.
    tiny = np.array([[0.1, 0.1, 0.101, 0.101]], np.float32)
    assert B.box_iou(tiny, tiny).numpy()[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_box_iou_gradient_matches_finite_differences():
    b1 = tf.constant([[1.0, 2.0, 8.0, 9.0], [0.5, 0.0, 4.0, 6.0]], tf.float64)
    b2 = tf.constant([[3.0, 1.0, 10.0, 7.0]], tf.float64)
    theo, num = tf.test.compute_gradient(lambda x: tf.cast(B.box_iou(x, b2), tf.float64), [b1])
    np.testing.assert_allclose(theo[0], num[0], atol=1e-3)


def test_box_iou_bad_input_names_argument():
    with pytest.raises(ValueError, match="boxes2"):
        B.box_iou(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(TypeError, match="boxes1"):
        B.box_iou(np.array([["a", "b", "c", "d"]]), np.zeros((3, 4)))


def test_validate_boxes_rejects_nan_naming_argument():
    with pytest.raises(tf.errors.InvalidArgumentError, match="gt_boxes"):
        B.validate_boxes(np.array([[0, 0, np.nan, 1]], np.float32), "gt_boxes")


# ---------------------------------------------------------------- conversions

def test_cxcywh_round_trip_and_hand_value():
    b = np.array([[2, 4, 10, 8]], np.float32)
    np.testing.assert_allclose(B.xyxy_to_cxcywh(b).numpy(), [[6, 6, 8, 4]])
    rng = np.random.default_rng(3)
    r = random_boxes(rng, 10)
    np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(r)).numpy(), r, atol=1e-4)


def test_normalized_yxyx_per_image_shapes():
    boxes = np.array([[[10, 20, 30, 40]], [[10, 20, 30, 40]]], np.float32)
    shapes = np.array([[100, 50], [200, 100]], np.float32)  # (height, width)
    out = B.xyxy_to_normalized_yxyx(boxes, shapes).numpy()
    np.testing.assert_allclose(out[0, 0], [20 / 100, 10 / 50, 40 / 100, 30 / 50], rtol=1e-6)
    np.testing.assert_allclose(out[1, 0], [20 / 200, 10 / 100, 40 / 200, 30 / 100], rtol=1e-6)
    np.testing.assert_allclose(B.normalized_yxyx_to_xyxy(out, shapes).numpy(), boxes, rtol=1e-5)
    single = B.xyxy_to_normalized_yxyx(boxes[0], (100, 50)).numpy()
    np.testing.assert_allclose(single, out[0], rtol=1e-6)


# ---------------------------------------------------------------- box coder

def test_encode_hand_value():
    anchor = np.array([[0, 0, 10, 10]], np.float32)
    box = np.array([[5, 5, 15, 25]], np.float32)
    # centers (5, 5) -> (10, 15), sizes (10, 10) -> (10, 20)
    expected = [[10 * 5 / 10, 10 * 10 / 10, 5 * math.log(1.0), 5 * math.log(2.0)]]
    np.testing.assert_allclose(B.encode_boxes(box, anchor).numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(B.encode_boxes(box, anchor, weights=(1, 1, 1, 1)).numpy(),
                               [[0.5, 1.0, 0.0, math.log(2.0)]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0),
                                     (20, 20, 10, 10)])
def test_encode_decode_match_numpy_and_round_trip(weights):
    rng = np.random.default_rng(4)
    boxes, anchors = random_boxes(rng, 50), random_boxes(rng, 50)
    enc = B.encode_boxes(boxes, anchors, weights).numpy()
    np.testing.assert_allclose(enc, np_encode(boxes.astype(np.float64), anchors, weights),
                               rtol=1e-4, atol=1e-4)
    dec = B.decode_boxes(enc, anchors, weights).numpy()
    np.testing.assert_allclose(dec, boxes, rtol=1e-4, atol=1e-3)
    deltas = rng.normal(0, 1, (50, 4)).astype(np.float32)
    np.testing.assert_allclose(B.decode_boxes(deltas, anchors, weights).numpy(),
                               np_decode(deltas.astype(np.float64), anchors, weights,
                                         math.log(1000 / 16)), rtol=1e-4, atol=1e-3)


def test_decode_clamps_size_and_stays_finite():
    anchors = np.array([[0, 0, 16, 16]], np.float32)
    out = B.decode_boxes(np.array([[0, 0, 1e4, 1e4]], np.float32), anchors).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000.0, rtol=1e-4)


def test_decode_batched_anchors_broadcast_and_gradient():
    rng = np.random.default_rng(5)
    anchors = random_boxes(rng, 6)
    deltas = rng.normal(0, 0.5, (2, 6, 4))
    out = B.decode_boxes(deltas.astype(np.float32), anchors).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i], np_decode(deltas[i], anchors, (10, 10, 5, 5),
                                                     math.log(1000 / 16)), rtol=1e-4, atol=1e-3)
    x = tf.constant(deltas[0], tf.float64)
    theo, num = tf.test.compute_gradient(
        lambda d: tf.cast(B.decode_boxes(d, anchors), tf.float64), [x], delta=1e-3)
    np.testing.assert_allclose(theo[0], num[0], rtol=1e-2, atol=1e-2)


def test_encode_and_clip_gradients_match_finite_differences():
    rng = np.random.default_rng(6)
    anchors = random_boxes(rng, 4)
    boxes = tf.constant(random_boxes(rng, 4), tf.float64)
    theo, num = tf.test.compute_gradient(
        lambda b: tf.cast(B.encode_boxes(b, anchors), tf.float64), [boxes], delta=1e-2)
    np.testing.assert_allclose(theo[0], num[0], rtol=1e-2, atol=1e-2)
    # Clipping passes the gradient of coordinates inside the image and blocks clipped ones.
    inside_and_out = tf.constant([[-5.0, 3.0, 20.0, 50.0]], tf.float64)
    theo, num = tf.test.compute_gradient(
        lambda b: tf.cast(B.clip_boxes(b, (40, 30)), tf.float64), [inside_and_out], delta=1e-2)
    np.testing.assert_allclose(theo[0], num[0], atol=1e-3)
    np.testing.assert_allclose(np.diag(theo[0]), [0, 1, 1, 0])


def test_coder_rejects_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        B.encode_boxes(np.zeros((1, 4)), np.ones((1, 4)), weights=(1, 1, 1))


# ---------------------------------------------------------------- clipping, small boxes

def test_clip_boxes_per_image_shapes():
    boxes = np.array([[[-5, -5, 70, 30]], [[-5, 10, 70, 300]]], np.float32)
    shapes = np.array([[20, 60], [100, 50]], np.int32)
    expected = boxes.copy()
    for i, (h, w) in enumerate(shapes):
        expected[i, :, [0, 2]] = np.clip(boxes[i, :, [0, 2]], 0, w)
        expected[i, :, [1, 3]] = np.clip(boxes[i, :, [1, 3]], 0, h)
    np.testing.assert_allclose(B.clip_boxes(boxes, shapes).numpy(), expected)
    np.testing.assert_allclose(B.clip_boxes(boxes[0], (20, 60)).numpy(), expected[0])


def test_clip_boxes_rejects_mismatched_shape_argument():
    with pytest.raises(ValueError, match="image_shape"):
        B.clip_boxes(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.float32))


def test_valid_mask_and_remove_small_boxes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 3, 10], [0, 0, 10, 2.9], [5, 5, 5, 5],
                      [0, 0, np.nan, 4], [1, 1, 4, 4]], np.float32)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    with np.errstate(invalid="ignore"):
        expected = (w >= 3) & (h >= 3) & (w > 0) & (h > 0)
    np.testing.assert_array_equal(B.valid_boxes_mask(boxes, 3.0).numpy(), expected)
    np.testing.assert_array_equal(B.remove_small_boxes(boxes, 3.0).numpy(), np.nonzero(expected)[0])
    np.testing.assert_array_equal(B.valid_boxes_mask(boxes[None], 3.0).numpy()[0], expected)


# ---------------------------------------------------------------- NMS

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_matches_numpy_per_class(seed):
    rng = np.random.default_rng(seed)
    n = 60
    boxes = random_boxes(rng, n)
    scores = rng.uniform(size=n).astype(np.float32)
    classes = rng.integers(0, 3, n).astype(np.int32)
    got = B.batched_nms(boxes, scores, classes, 0.4, 100).numpy()
    np.testing.assert_array_equal(got, np_class_nms(boxes, scores, classes, 0.4, 100))
    assert got.dtype == np.int32
    got = B.batched_nms(boxes, scores, classes, 0.5, 7, score_threshold=0.3).numpy()
    np.testing.assert_array_equal(got, np_class_nms(boxes, scores, classes, 0.5, 7, 0.3))


def test_batched_nms_different_classes_never_suppress():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    got = B.batched_nms(boxes, [0.9, 0.8, 0.7], [0, 1, 0], 0.5, 10).numpy()
    np.testing.assert_array_equal(got, [0, 1])


def test_batched_nms_padded_matches_numpy_per_image():
    rng = np.random.default_rng(7)
    b, n, k = 3, 40, 10
    boxes = np.stack([random_boxes(rng, n) for _ in range(b)])
    scores = rng.uniform(size=(b, n)).astype(np.float32)
    scores[2, :] = 0.0  # an image with nothing above the threshold
    classes = rng.integers(0, 4, (b, n)).astype(np.int32)
    out = B.batched_nms_padded(boxes, scores, classes, 0.5, k, score_threshold=0.2)
    for i in range(b):
        ref = np_class_nms(boxes[i], scores[i], classes[i], 0.5, k, 0.2)
        cnt = int(out["num_detections"][i])
        assert cnt == len(ref)
        np.testing.assert_array_equal(out["indices"][i, :cnt], ref)
        np.testing.assert_array_equal(out["indices"][i, cnt:], -1)
        np.testing.assert_allclose(out["boxes"][i, :cnt], boxes[i][ref])
        np.testing.assert_allclose(out["scores"][i, :cnt], scores[i][ref])
        np.testing.assert_array_equal(out["classes"][i, :cnt], classes[i][ref])
        np.testing.assert_array_equal(out["classes"][i, cnt:], -1)
        np.testing.assert_array_equal(out["scores"][i, cnt:], 0.0)


def test_batched_nms_padded_pre_nms_top_k_indexes_original_inputs():
    rng = np.random.default_rng(8)
    boxes = random_boxes(rng, 30)[None]
    scores = rng.uniform(size=(1, 30)).astype(np.float32)
    classes = np.zeros((1, 30), np.int32)
    out = B.batched_nms_padded(boxes, scores, classes, 0.5, 5, pre_nms_top_k=12)
    top = np.argsort(-scores[0])[:12]
    ref = top[np_class_nms(boxes[0][top], scores[0][top], classes[0][top], 0.5, 5)]
    cnt = int(out["num_detections"][0])
    np.testing.assert_array_equal(out["indices"][0, :cnt], ref)
    np.testing.assert_allclose(out["boxes"][0, :cnt], boxes[0][ref])


def np_multiclass_nms(boxes, scores, max_per_class, k, iou, thr):
    dets = []
    for c in range(scores.shape[1]):
        bc = boxes[:, c] if boxes.ndim == 3 else boxes
        keep = np_greedy_nms(bc, scores[:, c], iou, thr)[:max_per_class]
        dets += [(scores[i, c], c, bc[i]) for i in keep]
    dets.sort(key=lambda d: -d[0])
    return dets[:k]


@pytest.mark.parametrize("per_class_boxes", [False, True])
@pytest.mark.parametrize("max_per_class", [4, None])
def test_multiclass_nms_matches_numpy(per_class_boxes, max_per_class):
    rng = np.random.default_rng(9)
    b, n, c, k = 2, 25, 3, 12
    if per_class_boxes:
        boxes = random_boxes(rng, b * n * c).reshape(b, n, c, 4)
    else:
        boxes = random_boxes(rng, b * n).reshape(b, n, 4)
    scores = rng.uniform(size=(b, n, c)).astype(np.float32)
    out = B.multiclass_nms(boxes, scores, max_detections=k, iou_threshold=0.5,
                           score_threshold=0.3, max_per_class=max_per_class)
    for i in range(b):
        ref = np_multiclass_nms(boxes[i], scores[i], max_per_class or k, k, 0.5, 0.3)
        cnt = int(out["num_detections"][i])
        assert cnt == len(ref)
        np.testing.assert_allclose(out["scores"][i, :cnt], [d[0] for d in ref], rtol=1e-6)
        np.testing.assert_array_equal(out["classes"][i, :cnt], [d[1] for d in ref])
        np.testing.assert_allclose(out["boxes"][i, :cnt], np.stack([d[2] for d in ref]), rtol=1e-6)
        np.testing.assert_array_equal(out["classes"][i, cnt:], -1)


def test_nms_rejects_float_classes():
    with pytest.raises(TypeError, match="classes"):
        B.batched_nms(np.zeros((2, 4), np.float32), [0.1, 0.2], [0.0, 1.0], 0.5, 2)


class _PostProcess(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None]),
                                  tf.TensorSpec([None], tf.int32)])
    def single(self, boxes, scores, classes):
        return B.batched_nms(boxes, scores, classes, 0.5, 20)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 4]), tf.TensorSpec([None, None]),
                                  tf.TensorSpec([None, None], tf.int32)])
    def padded(self, boxes, scores, classes):
        return B.batched_nms_padded(boxes, scores, classes, 0.5, 8, score_threshold=0.1)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 4]), tf.TensorSpec([None, None, 3])])
    def multiclass(self, boxes, scores):
        return B.multiclass_nms(boxes, scores, 8, 0.5, 0.1, max_per_class=5)


def test_nms_runs_in_tf_function_and_saved_model(tmp_path):
    rng = np.random.default_rng(10)
    boxes = random_boxes(rng, 24).reshape(2, 12, 4)
    scores = rng.uniform(size=(2, 12)).astype(np.float32)
    classes = rng.integers(0, 3, (2, 12)).astype(np.int32)
    scores3 = rng.uniform(size=(2, 12, 3)).astype(np.float32)
    module = _PostProcess()
    before = (module.single(boxes[0], scores[0], classes[0]),
              module.padded(boxes, scores, classes), module.multiclass(boxes, scores3))
    tf.saved_model.save(module, str(tmp_path / "nms"))
    loaded = tf.saved_model.load(str(tmp_path / "nms"))
    after = (loaded.single(boxes[0], scores[0], classes[0]),
             loaded.padded(boxes, scores, classes), loaded.multiclass(boxes, scores3))
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(after[0], np_class_nms(boxes[0], scores[0], classes[0], 0.5, 20))
    for key in before[1]:
        np.testing.assert_array_equal(before[1][key], after[1][key])
    for key in before[2]:
        np.testing.assert_array_equal(before[2][key], after[2][key])


def test_nms_edge_cases_fewer_boxes_than_slots_and_empty():
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    classes = np.array([[0, 0, 1]], np.int32)
    out = B.batched_nms_padded(boxes, scores, classes, 0.5, 8, pre_nms_top_k=100)
    ref = np_class_nms(boxes[0], scores[0], classes[0], 0.5, 8)
    assert int(out["num_detections"][0]) == len(ref)
    np.testing.assert_array_equal(out["indices"][0], list(ref) + [-1] * (8 - len(ref)))
    empty = B.batched_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, np.int32), 0.5, 5)
    assert empty.shape == (0,)


def test_batched_nms_padded_same_indices_with_and_without_xla():
    """The greedy per-image kernel (graph / eager) and the tiled form XLA compiles keep the same
    boxes, on clustered boxes where most are suppressed (a trained RPN's proposals)."""
    rng = np.random.default_rng(11)
    centers = rng.uniform(40, 360, (12, 2))
    pick = rng.integers(0, 12, (2, 600))
    size = rng.uniform(20, 80, (12, 2))[pick] * np.exp(rng.normal(0, 0.05, (2, 600, 2)))
    middle = centers[pick] + rng.normal(0, 3, (2, 600, 2))
    boxes = np.concatenate([middle - size / 2, middle + size / 2], -1).astype(np.float32)
    scores = rng.uniform(size=(2, 600)).astype(np.float32)
    classes = rng.integers(0, 3, (2, 600)).astype(np.int32)

    def run(boxes, scores, classes):
        return B.batched_nms_padded(boxes, scores, classes, 0.5, 100, score_threshold=0.05)

    greedy = tf.function(run)(boxes, scores, classes)
    tiled = tf.function(run, jit_compile=True)(boxes, scores, classes)
    for i in range(2):
        ref = np_class_nms(boxes[i], scores[i], classes[i], 0.5, 100, 0.05)
        assert 20 < len(ref) < 100  # most boxes suppressed, fewer kept than slots
        for out in (greedy, tiled):
            assert int(out["num_detections"][i]) == len(ref)
            np.testing.assert_array_equal(out["indices"][i, :len(ref)], ref)
