"""paste_masks against a per-pixel loop written from its definition."""
import numpy as np
import pytest

from kerasdet.evaluation import paste_masks


def _reference(mask, box, height, width):
    """Per pixel: inside the box (by its center) -> bilinear sample of the grid, cell centers at
    x1 + (j + .5) * w / M, clamped to the edge cells; outside -> 0."""
    x1, y1, x2, y2 = box
    mh, mw = mask.shape
    out = np.zeros((height, width))
    for py in range(height):
        for px in range(width):
            cx, cy = px + 0.5, py + 0.5
            if not (x1 <= cx < x2 and y1 <= cy < y2):
                continue
            u = min(max((cx - x1) / (x2 - x1) * mw - 0.5, 0), mw - 1)
            v = min(max((cy - y1) / (y2 - y1) * mh - 0.5, 0), mh - 1)
            j0, i0 = int(np.floor(u)), int(np.floor(v))
            j1, i1 = min(j0 + 1, mw - 1), min(i0 + 1, mh - 1)
            a, b = u - j0, v - i0
            out[py, px] = ((1 - a) * (1 - b) * mask[i0, j0] + a * (1 - b) * mask[i0, j1]
                           + (1 - a) * b * mask[i1, j0] + a * b * mask[i1, j1])
    return out


@pytest.mark.parametrize("box", [
    [3.0, 2.0, 17.0, 12.0],      # whole pixels
    [2.3, 4.6, 9.1, 15.8],       # fractional
    [-4.0, -3.0, 6.5, 5.5],      # partly outside the image
    [15.2, 10.1, 30.0, 25.0],    # beyond the right / bottom border
])
def test_matches_reference(box):
    rng = np.random.default_rng(0)
    mask = rng.random((5, 4)).astype(np.float32)
    pasted = paste_masks(mask[None], [box], (16, 20))
    np.testing.assert_allclose(pasted[0], _reference(mask, box, 16, 20), atol=1e-6)


def test_constant_grid_fills_exactly_the_box():
    pasted = paste_masks(np.ones((1, 28, 28)), [[4, 6, 10, 9]], (12, 12))
    expected = np.zeros((12, 12))
    expected[6:9, 4:10] = 1
    np.testing.assert_array_equal(pasted[0], expected)
    assert paste_masks(np.ones((1, 2, 2)), [[5, 5, 5, 9]], (12, 12)).sum() == 0  # empty box


def test_bad_input():
    with pytest.raises(ValueError, match="N = 2 boxes"):
        paste_masks(np.ones((1, 4, 4)), np.ones((2, 4)), (8, 8))
    with pytest.raises(ValueError, match="NaN"):
        paste_masks(np.full((1, 4, 4), np.nan), [[0, 0, 4, 4]], (8, 8))
