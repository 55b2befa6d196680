"""Spatial pyramid pooling (kerasdet.ops.spp, kerasdet.layers.spp) against numpy references written
from SPP-net's definitions: bins of window ceil(a / n) and stride floor(a / n), the scale whose
scaled window has the number of pixels closest to 224 x 224, and the appendix's corner rule."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers import RoISpatialPyramidPooling, SpatialPyramidPooling
from kerasdet.ops import spp


# ------------------------------------------------------------------------------------------------
# numpy references
# ------------------------------------------------------------------------------------------------

def ref_ranges(a, n):
    """SPP-net bins (end exclusive); a < n: one pixel per bin at floor(i a / n) (our definition)."""
    if a < n:
        return [(math.floor(i * a / n), math.floor(i * a / n) + 1) for i in range(n)]
    win, stride = math.ceil(a / n), math.floor(a / n)
    return [(i * stride, i * stride + win) for i in range(n)]


def fast_rcnn_ranges(a, n):
    """Fast R-CNN RoIPool bins of a RoI a cells long starting at 0 (kerasdet.ops.roi's rule)."""
    return [(math.floor(i * a / n), min(math.ceil((i + 1) * a / n), a)) for i in range(n)]


def ref_spp(x, levels):
    """x [H, W, C] -> levels in order, each [C, n, n] flattened (channel, row, column)."""
    h, w, c = x.shape
    out = []
    for n in levels:
        level = np.empty((c, n, n), x.dtype)
        for i, (r0, r1) in enumerate(ref_ranges(h, n)):
            for j, (c0, c1) in enumerate(ref_ranges(w, n)):
                level[:, i, j] = x[r0:r1, c0:c1].max(axis=(0, 1))
        out.append(level.reshape(-1))
    return np.concatenate(out)


def ref_project(box, s, offset=0.0, size=None):
    """SPP-net appendix, 0-based: left floor(x/S)+1, right ceil(x/S)-1, clamped, >= 1 cell."""
    x1, y1, x2, y2 = [(v - offset) / s for v in box]
    out = []
    for lo, hi, high in ((x1, x2, None if size is None else size[1] - 1),
                         (y1, y2, None if size is None else size[0] - 1)):
        a, b = math.floor(lo) + 1, math.ceil(hi) - 1
        clamp = (lambda v: max(v, 0)) if high is None else (lambda v: min(max(v, 0), high))
        a, b = clamp(a), clamp(b)
        if b < a:
            a = b = clamp(round((lo + hi) / 2))
        out.append((a, b))
    (l, r), (t, b) = out
    return [l, t, r, b]


def distinct(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.permutation(np.prod(shape)).reshape(shape) / np.prod(shape)).astype(dtype)


# ------------------------------------------------------------------------------------------------
# bins
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,n,expected", [(13, 6, (3, 2)), (13, 3, (5, 4)), (13, 2, (7, 6)),
                                          (13, 1, (13, 13)), (10, 4, (3, 2)), (10, 6, (2, 1)),
                                          (3, 6, (1, 0)), (1, 1, (1, 1))])
def test_spp_bins_window_and_stride(a, n, expected):
    assert spp.spp_bins(a, n) == expected


def test_spp_bin_ranges_match_reference_and_stay_inside():
    for a in range(1, 40):
        for n in (1, 2, 3, 4, 6, 7):
            ranges = spp.spp_bin_ranges(a, n)
            assert ranges == ref_ranges(a, n)
            assert all(0 <= s < e <= a for s, e in ranges)
            if a < n:  # every pixel is read at least once
                assert {s for s, _ in ranges} == set(range(a))


def test_spp_bins_differ_from_fast_rcnn_roipool_at_a10_n4():
    # The paper's sliding-window bins overlap and leave the last row unread; RoIPool's reach it.
    assert spp.spp_bin_ranges(10, 4) == [(0, 3), (2, 5), (4, 7), (6, 9)]
    assert fast_rcnn_ranges(10, 4) == [(0, 3), (2, 5), (5, 8), (7, 10)]
    x = distinct((10, 10, 1))
    x[9, 9, 0] = 2.0  # the maximum sits in the row / column SPP never reads
    ours = ref_spp(x, (4,))
    assert ours.max() < 1.0
    roipool = max(x[r0:r1, c0:c1].max() for r0, r1 in fast_rcnn_ranges(10, 4)
                  for c0, c1 in fast_rcnn_ranges(10, 4))
    assert roipool == 2.0


def test_spp_bins_reject_bad_arguments():
    with pytest.raises(ValueError, match="`a` must be >= 1, got 0"):
        spp.spp_bins(0, 2)
    with pytest.raises(ValueError, match="`n` must be >= 1, got 0"):
        spp.spp_bins(5, 0)
    with pytest.raises(ValueError, match="`levels`"):
        spp.spatial_pyramid_pool(tf.zeros([1, 4, 4, 1]), levels=())


# ------------------------------------------------------------------------------------------------
# dense pooling
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", [(13, 13), (10, 10), (10, 7), (7, 16), (3, 5), (1, 1), (2, 9)])
def test_spatial_pyramid_pool_matches_reference(h, w):
    x = distinct((2, h, w, 3), seed=h * 100 + w)
    levels = (6, 3, 2, 1)
    out = spp.spatial_pyramid_pool(tf.constant(x), levels).numpy()
    assert out.shape == (2, 3 * 50)
    for b in range(2):
        np.testing.assert_array_equal(out[b], ref_spp(x[b], levels))


def test_output_order_is_level_then_channel_then_row_then_column():
    # Level 2 on a 2x2 map is the map itself: output = transpose to [C, 2, 2], flattened.
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    out = spp.spatial_pyramid_pool(tf.constant(x), (2, 1)).numpy()[0]
    np.testing.assert_array_equal(out[:12], x[0].transpose(2, 0, 1).reshape(-1))
    np.testing.assert_array_equal(out[12:], x[0].max(axis=(0, 1)))


def test_spatial_pyramid_pool_gradient():
    x = tf.constant(distinct((1, 5, 6, 2), seed=3, dtype=np.float64))  # overlapping bins
    fn = tf.function(lambda t: spp.spatial_pyramid_pool(t, (4, 2, 1)))  # traced: 5x faster than eager
    theoretical, numerical = tf.test.compute_gradient(fn, [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.abs(theoretical[0]).sum() > 0


def test_dynamic_shapes_in_graph():
    fn = tf.function(lambda t: spp.spatial_pyramid_pool(t),
                     input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    for h, w in ((13, 13), (10, 10), (5, 21)):
        x = distinct((1, h, w, 4), seed=h + w)
        out = fn(tf.constant(x)).numpy()
        assert out.shape == (1, 200)
        np.testing.assert_array_equal(out[0], ref_spp(x[0], spp.SPP_LEVELS))
    assert len(fn._list_all_concrete_functions()) == 1


# ------------------------------------------------------------------------------------------------
# RoI pooling
# ------------------------------------------------------------------------------------------------

def random_rois(rng, batch, count, h, w):
    x1 = rng.integers(0, w, (batch, count))
    y1 = rng.integers(0, h, (batch, count))
    x2 = np.minimum(x1 + rng.integers(0, w, (batch, count)), w - 1)
    y2 = np.minimum(y1 + rng.integers(0, h, (batch, count)), h - 1)
    return np.stack([x1, y1, x2, y2], -1).astype(np.int32)


def test_roi_spp_matches_reference_on_random_windows():
    rng = np.random.default_rng(7)
    x = distinct((2, 12, 15, 3), seed=1)
    rois = random_rois(rng, 2, 9, 12, 15)
    levels = (4, 2, 1)
    out = spp.roi_spatial_pyramid_pool(tf.constant(x), tf.constant(rois), levels=levels).numpy()
    assert out.shape == (2, 9, 3 * 21)
    for b in range(2):
        for r in range(9):
            x1, y1, x2, y2 = rois[b, r]
            np.testing.assert_array_equal(out[b, r], ref_spp(x[b, y1:y2 + 1, x1:x2 + 1], levels))
    flat = spp.roi_spatial_pyramid_pool(tf.constant(x), tf.constant(rois.reshape(-1, 4)),
                                        tf.constant(np.repeat([0, 1], 9)), levels).numpy()
    np.testing.assert_array_equal(flat, out.reshape(18, -1))


def test_roi_spp_clamps_windows_to_the_map():
    x = distinct((1, 6, 8, 2), seed=2)
    out = spp.roi_spatial_pyramid_pool(tf.constant(x), tf.constant([[[-3, 2, 20, 10], [5, 4, 2, 1]]]),
                                       levels=(2, 1)).numpy()
    np.testing.assert_array_equal(out[0, 0], ref_spp(x[0, 2:6, 0:8], (2, 1)))
    np.testing.assert_array_equal(out[0, 1], ref_spp(x[0, 4:5, 5:6], (2, 1)))  # x2 < x1 -> 1x1


def test_roi_spp_in_graph_with_dynamic_shapes():
    fn = tf.function(lambda f, r: spp.roi_spatial_pyramid_pool(f, r, levels=(3, 1)),
                     input_signature=[tf.TensorSpec([None, None, None, 2], tf.float32),
                                      tf.TensorSpec([None, None, 4], tf.int32)])
    rng = np.random.default_rng(3)
    for h, w, count in ((9, 11, 4), (5, 6, 7)):
        x = distinct((1, h, w, 2), seed=h)
        rois = random_rois(rng, 1, count, h, w)
        out = fn(tf.constant(x), tf.constant(rois)).numpy()
        assert out.shape == (1, count, 20)
        for r in range(count):
            x1, y1, x2, y2 = rois[0, r]
            np.testing.assert_array_equal(out[0, r], ref_spp(x[0, y1:y2 + 1, x1:x2 + 1], (3, 1)))


# ------------------------------------------------------------------------------------------------
# scale choice and corner projection
# ------------------------------------------------------------------------------------------------

def test_choose_scale_hand_worked():
    # 375 x 500 image: factor s / 375. A 100 x 100 window becomes 128, 153.6, 183.5, 230.4, 320
    # pixels a side; 230.4^2 = 53084 is closest to 50176 -> scale 864 (index 3).
    # A 300 x 200 window at 480: 384 x 256 = 98304 px, too big at every scale -> index 0.
    boxes = np.array([[10, 10, 110, 110], [0, 0, 300, 200], [0, 0, 10, 10]], np.float32)
    got = spp.choose_scale(boxes, image_size=(375, 500)).numpy()
    np.testing.assert_array_equal(got, [3, 0, 4])


def test_choose_scale_compares_areas_not_sides():
    # Shorter side 480 -> factors 1, 1.2, 1.433, 1.8, 2.5. A 103.5 px window is 186.3 px at 864
    # and 258.75 px at 1200: 258.75 is closer in side (34.75 < 37.7) but 186.3^2 = 34707 is closer
    # in area (15469 < 16776), and the paper counts pixels.
    box = np.array([0, 0, 103.5, 103.5], np.float32)
    sides = 103.5 * np.array(spp.SPP_SCALES) / 480.0
    assert np.argmin(np.abs(sides - 224)) == 4
    assert np.argmin(np.abs(sides ** 2 - 224 ** 2)) == 3
    assert int(spp.choose_scale(box[None], image_size=(480, 640))[0]) == 3


def test_choose_scale_batched_image_sizes():
    boxes = np.array([[[0, 0, 100, 100]], [[0, 0, 100, 100]]], np.float32)  # [B=2, N=1, 4]
    got = spp.choose_scale(boxes, image_size=np.array([[375, 500], [1200, 1600]])).numpy()
    # second image: factors s / 1200 -> 40 .. 100 px sides, the largest scale is closest
    np.testing.assert_array_equal(got, [[3], [4]])


def test_project_to_features_hand_worked():
    s = 16
    cases = [
        ((0, 0, 223, 223), (1, 1, 13, 13)),      # floor(0)+1, ceil(13.94)-1
        ((32, 48, 160, 100), (3, 4, 9, 6)),      # x2 = 160 is a multiple of S: 10 - 1
        ((40, 40, 50, 50), (3, 3, 3, 3)),        # floor(2.5)+1 = 3, ceil(3.125)-1 = 3
        ((33, 33, 40, 40), (2, 2, 2, 2)),        # rule empties it: 3 > 2 -> centre 2.28 -> 2
    ]
    for box, expected in cases:
        assert ref_project(box, s) == list(expected)
        assert spp.project_to_features(np.array([box], np.float32), s).numpy()[0].tolist() == \
            list(expected)
    # clamped to a 20 x 30 map; ZF5's offset of 20 shifts the grid
    got = spp.project_to_features(np.array([[-10, -10, 2000, 2000]], np.float32), 16,
                                  feature_size=(20, 30)).numpy()[0]
    assert got.tolist() == [0, 0, 29, 19]
    got = spp.project_to_features(np.array([[20, 20, 100, 100]], np.float32), 16, offset=20).numpy()
    assert got.tolist() == [[1, 1, 4, 4]]


def test_project_to_features_matches_reference_on_random_boxes():
    rng = np.random.default_rng(11)
    xy = rng.uniform(-30, 700, (200, 2))
    wh = rng.uniform(0, 400, (200, 2))
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    got = spp.project_to_features(boxes, 16, offset=20, feature_size=(30, 40)).numpy()
    for box, row in zip(boxes, got):
        ref = ref_project([float(v) for v in box], 16, 20, (30, 40))
        assert row.tolist() == ref
        assert row[2] >= row[0] and row[3] >= row[1]


def test_zf5_offset_is_the_receptive_field_centre():
    from kerasdet.backbones.zf import ZF5
    # The input pixels that reach conv5 column m (its 139-pixel receptive field, found as the
    # support of the gradient) are centred on column 16 m + 20: ZF5's `offset` is 20.
    model = ZF5(input_shape=(64, 400, 3), input_normalization=None)
    x = tf.random.uniform([1, 64, 400, 3], 0, 1, seed=1)
    for m in (8, 11):
        with tf.GradientTape() as tape:
            tape.watch(x)
            target = tf.reduce_sum(model(x)["conv5"][0, 1, m])
        g = tf.reduce_sum(tf.abs(tape.gradient(target, x)[0]), axis=(0, 2)).numpy()
        cols = np.nonzero(g)[0]
        assert (cols.min() + cols.max()) / 2 == 16 * m + 20


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------

def test_layers_symbolic_config_and_mixed_precision():
    inputs = keras.Input((None, None, 5))
    layer = SpatialPyramidPooling((3, 1))
    assert layer(inputs).shape == (None, 50)
    clone = SpatialPyramidPooling.from_config(layer.get_config())
    assert clone.levels == (3, 1)
    roi_layer = RoISpatialPyramidPooling.from_config(RoISpatialPyramidPooling((2,)).get_config())
    assert roi_layer.levels == (2,)

    x = distinct((1, 9, 7, 5), seed=4)
    rois = np.array([[[0, 0, 6, 8], [2, 3, 5, 4]]], np.int32)
    full = spp.spatial_pyramid_pool(tf.constant(x), (3, 1)).numpy()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        dense = SpatialPyramidPooling((3, 1))
        roi = RoISpatialPyramidPooling((3, 1))
        assert not roi.autocast
        out = dense(tf.constant(x))
        pooled = roi(tf.constant(x), tf.constant(rois.astype(np.float32)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float16 and pooled.dtype == tf.float16
    np.testing.assert_array_equal(out.numpy(), full.astype(np.float16))
    np.testing.assert_array_equal(pooled.numpy()[0, 0], full[0].astype(np.float16))
    np.testing.assert_array_equal(pooled.numpy()[0, 1],
                                  ref_spp(x[0, 3:5, 2:6], (3, 1)).astype(np.float16))


def test_roi_layer_symbolic_and_gradient():
    features = keras.Input((None, None, 4))
    rois = keras.Input((None, 4), dtype="int32")
    out = RoISpatialPyramidPooling((2, 1))(features, rois)
    assert tuple(out.shape) == (None, None, 20)
    x = tf.constant(distinct((1, 6, 7, 4), seed=5))
    windows = tf.constant([[[0, 0, 4, 5], [3, 1, 6, 2]]], tf.int32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled = spp.roi_spatial_pyramid_pool(x, windows, levels=(2, 1))
        total = tf.reduce_sum(pooled)
    grad = tape.gradient(total, x).numpy()
    # each output is one pixel's value, so the gradient counts how often a pixel is a bin's max
    expected = np.zeros(x.shape, np.float32)
    values = pooled.numpy().reshape(-1)
    flat = x.numpy().reshape(-1)
    for v in values:
        expected.reshape(-1)[np.nonzero(flat == v)[0]] += 1.0  # distinct values: one pixel each
    np.testing.assert_array_equal(grad, expected)
    theoretical, numerical = tf.test.compute_gradient(
        tf.function(lambda t: spp.roi_spatial_pyramid_pool(t, windows, levels=(2, 1))),
        [tf.cast(x, tf.float64)])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
