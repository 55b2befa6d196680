"""kerasdet.ops.anchors against hand-computed values and a loop-based numpy reference."""
import math

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.ops import anchors as A


def np_anchors(h, w, stride, sizes, ratios):
    """Reference from the definition: loop over rows, columns, ratios, sizes in that order."""
    out = []
    for y in range(h):
        for x in range(w):
            cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
            for r in ratios:
                for s in sizes:
                    aw, ah = s / math.sqrt(r), s * math.sqrt(r)  # area s^2, h / w = r
                    out.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    return np.array(out, np.float64).reshape(-1, 4)


def test_square_anchors_on_2x2_map_hand_values():
    got = A.generate_anchors((2, 2), 16, sizes=(32,), aspect_ratios=(1.0,)).numpy()
    # centers (8, 8), (24, 8), (8, 24), (24, 24); half size 16
    expected = [[-8, -8, 24, 24], [8, -8, 40, 24], [-8, 8, 24, 40], [8, 8, 40, 40]]
    np.testing.assert_allclose(got, expected)


def test_ratio_anchor_shape_is_h_over_w_with_area_preserved():
    got = A.generate_anchors((1, 1), 8, sizes=(16,), aspect_ratios=(2.0,)).numpy()[0]
    w, h = got[2] - got[0], got[3] - got[1]
    assert h / w == pytest.approx(2.0, rel=1e-6)
    assert w * h == pytest.approx(256.0, rel=1e-5)
    assert ((got[0] + got[2]) / 2, (got[1] + got[3]) / 2) == pytest.approx((4.0, 4.0))


def test_2x2_map_multiple_sizes_and_ratios_matches_reference_order():
    sizes, ratios = (32, 64), (0.5, 1.0, 2.0)
    got = A.generate_anchors((2, 3), 16, sizes, ratios).numpy()
    assert got.shape == (2 * 3 * 6, 4)
    np.testing.assert_allclose(got, np_anchors(2, 3, 16, sizes, ratios), rtol=1e-5, atol=1e-4)


def test_order_matches_conv_head_channel_layout():
    # A head output [H, W, A * 4] reshaped to [H * W * A, 4] must pair row i with anchor i.
    h, w, a = 3, 2, 6
    anchors = A.generate_anchors((h, w), 8, (16, 32), (0.5, 1.0, 2.0)).numpy()
    head = np.arange(h * w * a * 4).reshape(h, w, a * 4)
    rows = head.reshape(-1, 4)
    y, x, t = 2, 1, 4  # cell (row 2, column 1), anchor type 4 = ratio index 2 (2.0), size index 0
    i = (y * w + x) * a + t
    np.testing.assert_array_equal(rows[i], head[y, x, 4 * t:4 * t + 4])
    cx, cy = (anchors[i, 0] + anchors[i, 2]) / 2, (anchors[i, 1] + anchors[i, 3]) / 2
    assert (cx, cy) == pytest.approx(((x + 0.5) * 8, (y + 0.5) * 8))
    assert anchors[i, 3] - anchors[i, 1] == pytest.approx(16 * math.sqrt(2.0), rel=1e-5)


def test_dynamic_feature_size_inside_tf_function():
    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 8])])
    def anchors_for(features):
        return A.generate_anchors(tf.shape(features)[1:3], 16, (32,), (0.5, 1.0, 2.0))

    got = anchors_for(tf.zeros([1, 3, 5, 8])).numpy()
    np.testing.assert_allclose(got, np_anchors(3, 5, 16, (32,), (0.5, 1.0, 2.0)), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("preset,strides,sizes,a", [
    ("faster_rcnn", [16], [[128, 256, 512]], 9),
    ("fpn", [4, 8, 16, 32, 64], [[32], [64], [128], [256], [512]], 3),
    ("refinedet", [8, 16, 32, 64], [[32], [64], [128], [256]], 3),
])
def test_presets_follow_the_papers(preset, strides, sizes, a):
    gen = getattr(A.AnchorGenerator, preset)()
    assert list(gen.strides) == strides
    assert [list(s) for s in gen.sizes] == sizes
    assert all(list(r) == [0.5, 1.0, 2.0] for r in gen.aspect_ratios)
    assert gen.num_anchors_per_location == [a] * len(strides)
    levels = gen([(2, 2)] * len(strides))
    for level, st, sz in zip(levels, strides, sizes):
        np.testing.assert_allclose(level.numpy(), np_anchors(2, 2, st, sz, (0.5, 1, 2)),
                                   rtol=1e-5, atol=1e-3)


def test_generator_config_round_trip_and_for_image():
    gen = A.AnchorGenerator.fpn()
    clone = A.AnchorGenerator.from_config(gen.get_config())
    assert clone.get_config() == gen.get_config()
    all_anchors = gen.for_image((64, 96)).numpy()
    expected = np.concatenate([
        np_anchors(math.ceil(64 / s), math.ceil(96 / s), s, (8 * s,), (0.5, 1, 2))
        for s in (4, 8, 16, 32, 64)])
    np.testing.assert_allclose(all_anchors, expected, rtol=1e-5, atol=1e-3)


def test_bad_configuration_names_argument():
    with pytest.raises(ValueError, match="sizes"):
        A.AnchorGenerator(strides=(8, 16), sizes=[(32,)])
    with pytest.raises(ValueError, match="aspect_ratios"):
        A.generate_anchors((2, 2), 8, (32,), (0.0,))
    with pytest.raises(ValueError, match="stride"):
        A.generate_anchors((2, 2), -8, (32,), (1.0,))


def test_anchors_inside_image_mask_per_image():
    anchors = np.array([[0, 0, 10, 10], [-1, 0, 10, 10], [50, 50, 60, 70], [0, 0, 64, 64]],
                       np.float32)
    shapes = np.array([[64, 64], [70, 60]])

    def ref(h, w, border):
        return ((anchors[:, 0] >= -border) & (anchors[:, 1] >= -border)
                & (anchors[:, 2] <= w + border) & (anchors[:, 3] <= h + border))

    got = A.anchors_inside_image_mask(anchors, shapes).numpy()
    np.testing.assert_array_equal(got, np.stack([ref(64, 64, 0), ref(70, 60, 0)]))
    np.testing.assert_array_equal(A.anchors_inside_image_mask(anchors, (64, 64), 2).numpy(),
                                  ref(64, 64, 2))
