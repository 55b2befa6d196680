"""OverFeat's offset pooling, dense classifier interleaving and greedy merge (issue #15) against
numpy references written from the paper's sections 3.3 and 4.3."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones.overfeat import OverFeat
from kerasdet.ops import overfeat as ops


def offset_pool_reference(features, pool, dy, dx, h, w):
    """Figure 3 (b): non-overlapping p x p max pooling starting at pixel offset (dy, dx)."""
    b, _, _, c = features.shape
    out = np.zeros((b, h, w, c), features.dtype)
    for i in range(h):
        for j in range(w):
            y, x = dy + pool * i, dx + pool * j
            out[:, i, j] = features[:, y:y + pool, x:x + pool].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [(17, 17), (20, 23), (11, 13)])
def test_offset_max_pool_matches_numpy_reference(size):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, *size, 3)).astype(np.float32)
    copies = ops.offset_max_pool(features, pool=3).numpy()
    h, w = (size[0] - 2) // 3, (size[1] - 2) // 3
    assert copies.shape == (9, 2, h, w, 3)
    for k, (dy, dx) in enumerate((dy, dx) for dy in range(3) for dx in range(3)):
        np.testing.assert_array_equal(copies[k], offset_pool_reference(features, 3, dy, dx, h, w))


def test_offset_max_pool_gradient():
    rng = np.random.default_rng(1)
    # distinct values so every max is unique and the numerical gradient is well defined
    features = tf.constant(rng.permutation(2 * 8 * 7).reshape(1, 8, 7, 2).astype(np.float64) / 10)
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: ops.offset_max_pool(x, pool=3), [features], delta=1e-3)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)


def test_dense_classifier_interleaved_equals_classifier_on_every_window():
    """Fine output (u, v) = the classifier on the p x p max-pooling of unpooled cells
    [u, u + p k) x [v, v + p k) (figure 3 (d)-(e)); the classifier here is one k x k linear layer."""
    rng = np.random.default_rng(2)
    pool, k, classes = 3, 5, 4
    features = rng.normal(size=(1, 23, 29, 2)).astype(np.float32)
    weights = rng.normal(size=(k, k, 2, classes)).astype(np.float32)
    copies = ops.offset_max_pool(features, pool)
    p2, b, h, w, c = copies.shape
    flat = tf.reshape(copies, [p2 * b, h, w, c])
    maps = tf.nn.conv2d(flat, weights, 1, "VALID")
    fine = ops.interleave_offsets(tf.reshape(maps, [p2, b, h - k + 1, w - k + 1, classes]), pool).numpy()
    assert fine.shape == (1, 3 * (h - k + 1), 3 * (w - k + 1), classes)  # 9 x 15, table 5 scale 3
    for u in range(fine.shape[1]):
        for v in range(fine.shape[2]):
            window = features[0, u:u + pool * k, v:v + pool * k]
            pooled = window.reshape(k, pool, k, pool, 2).max(axis=(1, 3))
            np.testing.assert_allclose(fine[0, u, v], np.einsum("ijc,ijck->k", pooled, weights),
                                       rtol=1e-4, atol=1e-4)


# Table 5 of the paper (accurate model): input size, layer-5 unpooled map, pooled (per offset),
# classifier map per offset, interleaved output map.
TABLE_5 = [((245, 245), (17, 17), (5, 5), (1, 1), (3, 3)),
           ((281, 317), (20, 23), (6, 7), (2, 3), (6, 9)),
           ((317, 389), (23, 29), (7, 9), (3, 5), (9, 15)),
           ((389, 461), (29, 35), (9, 11), (5, 7), (15, 21)),
           # Row 5 of the seed reads layer 5 = 32x35, pooled 10x11, classifier 6x7, output 18x24:
           # inconsistent with table 3 (497 -> 7x7/2 -> 246 -> /3 -> 82 -> 7x7 -> 76 -> /2 -> 38)
           # and with itself (6x7 offsets x 3 = 18x21, not 18x24). Table 3's arithmetic gives 32x38,
           # 10x12, 6x8 and 18x24, which agrees with the row's last column.
           ((425, 497), (32, 38), (10, 12), (6, 8), (18, 24)),
           ((461, 569), (35, 44), (11, 14), (7, 10), (21, 30))]


def test_fine_stride_sizes_match_table_5_for_the_accurate_model():
    model = OverFeat(variant="accurate", include_top=False)
    for size, unpooled, pooled, per_offset, output in TABLE_5:
        features = model.compute_output_spec(tf.keras.Input(batch_shape=(1, *size, 3)))["features"]
        assert tuple(features.shape[1:3]) == unpooled
        assert (ops.pooled_size(unpooled[0], 3), ops.pooled_size(unpooled[1], 3)) == pooled
        assert (pooled[0] - 4, pooled[1] - 4) == per_offset  # 5x5 classifier input
        assert (3 * per_offset[0], 3 * per_offset[1]) == output
    # total subsampling: 36 for the network's own pooling, 12 with the offsets
    assert model.strides == {"features": 12, "pooled": 36}


def test_window_boxes_and_coverage():
    boxes = ops.window_boxes(2, 3, 12, 221).numpy()
    np.testing.assert_array_equal(boxes[1, 2], [24, 12, 245, 233])
    cov = ops.coverage(tf.constant([[0., 0, 10, 10]]), tf.constant([[5., 0, 15, 10], [0, 0, 4, 4]])).numpy()
    np.testing.assert_allclose(cov, [[0.5, 1.0]])


def test_match_score_matches_numpy():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, size=(6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, size=(6, 2))], 1).astype(np.float32)
    table = ops.match_score(boxes, boxes).numpy()
    for i in range(6):
        for j in range(6):
            assert table[i, j] == pytest.approx(ops.match_score_numpy(boxes[i], boxes[j]), abs=1e-5)
    assert np.allclose(np.diag(table), 0.0, atol=1e-6)


def test_greedy_merge_hand_made_boxes():
    # Three boxes on one object, two on another, a lone box, and a box of another class that sits on
    # the first object (never merged across classes).
    boxes = np.array([[10, 10, 50, 50], [12, 10, 52, 50], [10, 14, 50, 54],
                      [100, 100, 130, 130], [102, 101, 131, 132], [200, 10, 220, 30],
                      [10, 10, 50, 50]], np.float32)
    scores = np.array([0.5, 0.4, 0.3, 0.6, 0.2, 0.9, 0.7], np.float32)
    classes = np.array([0, 0, 0, 0, 0, 0, 1], np.int32)
    out_boxes, out_scores, alive = [t.numpy() for t in ops.greedy_merge(
        boxes, scores, classes, np.ones(7, bool), threshold=0.5)]
    ref_boxes, ref_scores, ref_classes = ops.greedy_merge_numpy(boxes, scores, classes, 0.5)
    assert alive.sum() == len(ref_boxes) == 4
    np.testing.assert_allclose(out_boxes[alive], np.array(ref_boxes), rtol=1e-6)
    np.testing.assert_allclose(out_scores[alive], ref_scores, rtol=1e-6)
    np.testing.assert_array_equal(classes[alive], ref_classes)
    # by hand: boxes 0 and 1 merge first (score 0.05 + 0.0952), then box 2 joins their mean
    first = (boxes[0] + boxes[1]) / 2
    np.testing.assert_allclose(out_boxes[0], (first + boxes[2]) / 2, rtol=1e-6)
    assert out_scores[0] == pytest.approx(1.2)
    assert out_scores[3] == pytest.approx(0.8)


def test_greedy_merge_stop_rule():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [5, 0, 15, 10]], np.float32)
    classes = np.zeros(3, np.int32)
    scores = np.ones(3, np.float32)
    s01 = ops.match_score_numpy(boxes[0], boxes[1])
    # just below the best pair's score nothing merges; just above, exactly that pair merges, and the
    # merged box's score against box 2 decides the next step
    _, _, alive = ops.greedy_merge(boxes, scores, classes, np.ones(3, bool), threshold=s01 - 1e-4)
    assert alive.numpy().all()
    merged = (boxes[0] + boxes[1]) / 2
    s_next = ops.match_score_numpy(merged, boxes[2])
    for threshold, expected in ((s01 + 1e-4, 2), (s_next + 1e-4, 1)):
        assert threshold < s_next or expected == 1
        _, out_scores, alive = ops.greedy_merge(boxes, scores, classes, np.ones(3, bool), threshold)
        assert alive.numpy().sum() == expected
        assert len(ops.greedy_merge_numpy(boxes, scores, classes, threshold)[0]) == expected
        assert out_scores.numpy()[alive.numpy()].sum() == pytest.approx(3.0)


def test_greedy_merge_random_boxes_match_numpy_and_ignore_padding():
    rng = np.random.default_rng(4)
    for trial in range(3):
        n = 24
        xy = rng.uniform(0, 80, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 30, size=(n, 2))], 1).astype(np.float32)
        scores = rng.uniform(size=n).astype(np.float32)
        classes = rng.integers(0, 2, size=n).astype(np.int32)
        valid = np.arange(n) < 20
        out_boxes, out_scores, alive = [t.numpy() for t in tf.function(ops.greedy_merge)(
            boxes, scores, classes, valid, tf.constant(0.8))]
        ref = ops.greedy_merge_numpy(boxes[:20], scores[:20], classes[:20], 0.8)
        assert not alive[20:].any()
        np.testing.assert_allclose(out_boxes[alive], np.array(ref[0]).reshape(-1, 4), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out_scores[alive], ref[1], rtol=1e-5)


def test_greedy_merge_empty_and_single():
    for n in (0, 1):
        boxes, scores, alive = ops.greedy_merge(np.zeros((n, 4), np.float32), np.zeros(n, np.float32),
                                                np.zeros(n, np.int32), np.ones(n, bool), 1.0)
        assert alive.numpy().sum() == n
