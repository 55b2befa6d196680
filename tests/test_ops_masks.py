"""kerasdet.ops.resample_masks' thresholded form (the Mask R-CNN paste's fast path) against the
float form and an independent numpy reference (tests/mask_reference.py's interpolation weights)."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.heads.mask_head import paste_masks
from kerasdet.ops.masks import resample_masks
from mask_reference import interpolation_weights


def _reference(mask, cover_box, height, width):
    """`mask` [m, m] covering `cover_box`, resampled onto every pixel of a height x width canvas."""
    x1, y1, x2, y2 = cover_box
    rows = interpolation_weights(np.arange(height) + 0.5, y1, y2, mask.shape[0])
    cols = interpolation_weights(np.arange(width) + 0.5, x1, x2, mask.shape[1])
    return rows @ np.asarray(mask, np.float64) @ cols.T


def _problem(seed=0, count=7, grid=9, height=37, width=53):
    rng = np.random.default_rng(seed)
    masks = rng.uniform(0, 1, (count, grid, grid)).astype(np.float32)
    x1, y1 = rng.uniform(-5, width - 4, count), rng.uniform(-5, height - 4, count)
    w, h = rng.uniform(0.5, 30, count), rng.uniform(0.5, 30, count)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], -1).astype(np.float32)
    boxes[0] = [3.0, 4.0, 20.0, 11.0]  # whole-pixel edges: centres exactly on the grid's cells
    return masks, boxes, height, width


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0, -0.1])
def test_thresholded_resampling_is_the_float_resampling_thresholded(threshold):
    masks, boxes, height, width = _problem()
    canvas = np.tile([[0.0, 0.0, width, height]], (len(masks), 1)).astype(np.float32)
    args = (masks, boxes, canvas, np.arange(len(masks)), (height, width))
    floats = resample_masks(*args).numpy()
    binary = resample_masks(*args, threshold=threshold).numpy()
    assert binary.dtype == np.bool_ and binary.shape == floats.shape
    np.testing.assert_array_equal(binary, floats >= threshold)


def test_thresholded_paste_matches_a_numpy_reference():
    masks, boxes, height, width = _problem(seed=1)
    pasted = paste_masks(masks[None], boxes[None], (height, width), threshold=0.5).numpy()[0]
    for mask, box, got in zip(masks, boxes, pasted):
        want = _reference(mask, box, height, width)
        decided = np.abs(want - 0.5) > 1e-5  # leave cells on the threshold to float rounding
        np.testing.assert_array_equal(got[decided], (want >= 0.5)[decided])
        assert decided.mean() > 0.99
