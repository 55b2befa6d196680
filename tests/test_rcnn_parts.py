"""R-CNN's parts against numpy references written from the paper (Girshick et al. 2014): warped
crops with context (section 2.1, appendix A), the SVM example rules and hard negative cache
(section 2.3, appendix B), and the ridge box regression (appendix C)."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import ops
from kerasdet.heads import region_svms
from kerasdet.ops.warp import context_boxes, warp_regions


# ----------------------------------------------------------------------------- warped crops
def warp_reference(image, box, size, padding, fill):
    """Bilinear samples of `image` [H, W, C] at the centres of a size x size grid over the box
    dilated by padding * w / (size - 2 padding) on each side; samples outside the pixel grid take
    `fill`."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    ex, ey = padding * w / (size - 2 * padding), padding * h / (size - 2 * padding)
    x1, x2, y1, y2 = x1 - ex, x2 + ex, y1 - ey, y2 + ey
    height, width, _ = image.shape
    out = np.zeros((size, size, image.shape[2]))
    for i in range(size):
        for j in range(size):
            y = y1 + (i + 0.5) * (y2 - y1) / size - 0.5
            x = x1 + (j + 0.5) * (x2 - x1) / size - 0.5
            if not (0 <= y <= height - 1 and 0 <= x <= width - 1):
                out[i, j] = fill
                continue
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (image[y0, x0] * (1 - dy) * (1 - dx) + image[y0, x1_] * (1 - dy) * dx
                         + image[y1_, x0] * dy * (1 - dx) + image[y1_, x1_] * dy * dx)
    return out


def test_context_dilation_gives_p_pixels_at_the_warped_scale():
    # a 195-pixel box warped to 227 with p = 16: 16 px of context each side at scale 1
    np.testing.assert_allclose(context_boxes([[100.0, 50.0, 295.0, 245.0]], 227, 16).numpy(),
                               [[84.0, 34.0, 311.0, 261.0]], atol=1e-4)
    np.testing.assert_allclose(context_boxes([[0.0, 0.0, 10.0, 20.0]], 227, 0).numpy(), [[0, 0, 10, 20]])
    with pytest.raises(ValueError, match="padding"):
        context_boxes([[0.0, 0.0, 1.0, 1.0]], 32, 16)


@pytest.mark.parametrize("padding", [0, 4])
def test_warped_crops_match_the_numpy_reference(padding):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(2, 20, 30, 3)).astype(np.float32)
    # inside, partly outside the image (mean fill), thin and wide (anisotropic warp)
    boxes = np.array([[3.0, 4.0, 15.0, 12.0], [-5.0, 10.0, 12.0, 26.0], [20.0, 2.0, 29.5, 4.0],
                      [0.0, 0.0, 30.0, 20.0]], np.float32)
    indices = np.array([0, 1, 1, 0], np.int32)
    fill = np.array([120.0, 110.0, 100.0], np.float32)
    crops = warp_regions(images, boxes, indices, 16, padding, fill).numpy()
    assert crops.shape == (4, 16, 16, 3)
    for n in range(4):
        np.testing.assert_allclose(crops[n], warp_reference(images[indices[n]], boxes[n], 16, padding, fill),
                                   rtol=1e-4, atol=1e-2)


def test_warped_crops_gradient_reaches_the_image():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.normal(size=(1, 6, 7, 2)))
    boxes = tf.constant([[1.2, 0.7, 5.5, 4.9]], tf.float32)
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: tf.cast(warp_regions(x, boxes, [0], 4, 1), tf.float64), [image], delta=1e-3)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-3)


# ----------------------------------------------------------------------------- SVM examples
def test_svm_examples_follow_the_papers_rules():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    labels = [0, 1]
    proposals = [[0, 0, 10, 10],      # IoU 1 with the class-0 box
                 [0, 0, 10, 5],       # IoU 0.5 with it: grey zone for class 0
                 [0, 0, 10, 2],       # IoU 0.2: a negative of class 0
                 [20, 20, 30, 30],    # the class-1 box: a negative of class 0 (other class)
                 [50, 50, 60, 60]]    # background for both
    positives, negatives = region_svms.svm_examples(proposals, gt, labels, 3)
    # positives are the ground-truth boxes only, never proposals
    assert [p.tolist() for p in positives] == [[0], [1], []]
    assert negatives[0].tolist() == [2, 3, 4]
    assert negatives[1].tolist() == [0, 1, 2, 4]
    assert negatives[2].tolist() == [0, 1, 2, 3, 4]  # no instance: every proposal


def test_hard_negative_cache_adds_once_and_evicts_easy_rows():
    cache = region_svms.HardNegativeCache(2)
    cache.add(0, [(1, 0), (1, 1)], np.array([[1.0, 0.0], [0.0, 1.0]]))
    cache.add(0, [(1, 0), (2, 5)], np.array([[9.0, 9.0], [3.0, 0.0]]))  # (1, 0) is kept as first seen
    assert len(cache) == 3
    np.testing.assert_array_equal(cache.matrix(0, 2)[0], [1.0, 0.0])
    # w = (1, 0), b = -2: scores -1, -2, 1; rows below -1.2 go
    assert cache.evict(0, np.array([1.0, 0.0]), -2.0, -1.2) == 1
    assert sorted(cache.rows[0]) == [(1, 0), (2, 5)]
    assert cache.matrix(1, 2).shape == (0, 2)


def test_linear_svm_separates_and_handles_missing_examples():
    rng = np.random.default_rng(2)
    positives = rng.normal(size=(40, 5)) + 3.0
    negatives = rng.normal(size=(200, 5)) - 3.0
    settings = region_svms.SVMSettings(C=1.0)
    w, b = region_svms.fit_linear_svm(positives, negatives, settings)
    assert (positives @ w + b > 0).mean() > 0.95 and (negatives @ w + b < 0).mean() > 0.95
    w, b = region_svms.fit_linear_svm(np.zeros((0, 5)), negatives, settings)
    assert not w.any() and b == -1.0


def test_feature_scale_brings_the_mean_norm_to_twenty():
    x = np.random.default_rng(3).normal(size=(50, 8)) * 7
    scale = region_svms.feature_scale(x)
    assert np.linalg.norm(x * scale, axis=1).mean() == pytest.approx(20.0)
    assert region_svms.feature_scale(np.zeros((3, 4))) == 1.0


# ----------------------------------------------------------------------------- box regression
def test_regression_targets_are_appendix_c_and_match_the_box_coder():
    proposals = np.array([[10.0, 20.0, 50.0, 40.0]])
    gt = np.array([[12.0, 18.0, 60.0, 44.0]])
    # P: centre (30, 30), size (40, 20); G: centre (36, 31), size (48, 26)
    expected = [[6 / 40, 1 / 20, np.log(48 / 40), np.log(26 / 20)]]
    np.testing.assert_allclose(region_svms.regression_targets(proposals, gt), expected, rtol=1e-12)
    coder = ops.encode_boxes(gt.astype(np.float32), proposals.astype(np.float32), weights=(1, 1, 1, 1))
    np.testing.assert_allclose(coder.numpy(), expected, rtol=1e-5)
    back = ops.decode_boxes(coder, proposals.astype(np.float32), weights=(1, 1, 1, 1))
    np.testing.assert_allclose(back.numpy(), gt, atol=1e-3)


def test_regression_pairs_take_proposals_above_0_6_with_their_best_box():
    gt, labels = np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([2, 0])
    proposals = np.array([[0, 0, 10, 8],     # IoU 0.8 with box 0
                          [0, 0, 10, 6],     # IoU 0.6: not above
                          [21, 21, 30, 30],  # IoU 0.81 with box 1
                          [40, 40, 50, 50]])
    index, classes, targets = region_svms.regression_pairs(proposals, gt, labels, 0.6)
    assert index.tolist() == [0, 2] and classes.tolist() == [2, 0]
    np.testing.assert_allclose(targets, region_svms.regression_targets(proposals[[0, 2]], gt[[0, 1]]))


def test_ridge_matches_the_closed_form_with_an_unpenalized_intercept():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 7))
    y = x @ rng.normal(size=(7, 4)) + rng.normal(size=4) + 0.1 * rng.normal(size=(60, 4))
    w, b = region_svms.fit_ridge(x, y, lam=1000.0)
    xc, yc = x - x.mean(0), y - y.mean(0)
    w_ref = np.linalg.solve(xc.T @ xc + 1000.0 * np.eye(7), xc.T @ yc)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b, y.mean(0) - x.mean(0) @ w_ref, rtol=1e-6, atol=1e-9)
    assert region_svms.fit_ridge(np.zeros((0, 7)), np.zeros((0, 4))) is None
