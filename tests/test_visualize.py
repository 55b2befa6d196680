"""Drawing detections: outline pixels take the class color, masks blend, captions sit on a colored band."""
import numpy as np
import pytest
from PIL import Image

from kerasdet.visualize import class_color, draw_detections, draw_ground_truth_and_predictions, save_png

GRAY = 128


def _gray(h=200, w=240):
    return np.full((h, w, 3), GRAY, np.float32)


def test_box_outline_takes_the_class_color_and_png_round_trips(tmp_path):
    image = _gray()
    box = [50, 60, 150, 160]
    drawn = draw_detections(image, [box], classes=[3], scores=[0.9], class_names=list("abcd"))
    assert drawn.dtype == np.uint8 and drawn.shape == (200, 240, 3)
    color = np.array(class_color(3))
    mid_y = 110
    # left and right edges, at mid height (far from the caption above the box)
    assert np.array_equal(drawn[mid_y, 50], color)
    assert np.array_equal(drawn[mid_y, 150], color)
    assert np.array_equal(drawn[160, 100], color)  # bottom edge
    # inside and outside the box nothing changed
    assert np.all(drawn[mid_y, 60:140] == GRAY) and np.all(drawn[mid_y, 160:] == GRAY)
    # caption band just above the box: a class-colored background at least 8 rows tall, starting
    # at the box's left edge, with light ink (the color is dark) for the text "d 0.90"
    colored = np.all(drawn[:60] == color, axis=-1)
    rows, cols = np.flatnonzero(colored.any(axis=1)), np.flatnonzero(colored.any(axis=0))
    assert rows.max() == 59 and rows.max() - rows.min() >= 8 and cols.min() == 50
    band = drawn[rows.min():60, cols.min():cols.max() + 1]
    assert np.any(band.min(axis=-1) > 150)  # anti-aliased white glyph pixels
    assert np.all(image == GRAY)  # the input is not modified

    path = save_png(drawn, tmp_path / "sub" / "det.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert np.array_equal(np.asarray(saved), drawn)


def test_mask_blends_with_alpha():
    image = _gray(64, 64)
    mask = np.zeros((1, 64, 64), np.float32)
    mask[0, 20:40, 20:40] = 0.8  # probabilities above the 0.5 threshold
    alpha = 0.45
    drawn = draw_detections(image, [[10, 10, 50, 50]], classes=[1], masks=mask, mask_alpha=alpha)
    expected = np.round((1 - alpha) * GRAY + alpha * np.array(class_color(1)))
    np.testing.assert_allclose(drawn[30, 30], expected, atol=1)
    assert np.all(drawn[15, 15] == GRAY)  # inside the box but outside the mask


def test_score_threshold_hides_low_scores():
    image = _gray()
    drawn = draw_detections(image, [[50, 60, 150, 160], [10, 10, 30, 30]], classes=[0, 1],
                            scores=[0.2, 0.9], score_threshold=0.5)
    assert np.all(drawn[110, 50] == GRAY)  # the 0.2 box is not drawn
    assert np.array_equal(drawn[20, 10], class_color(1))


def test_class_colors_are_fixed_and_distinct():
    colors = [class_color(i) for i in range(60)]
    assert colors == [class_color(i) for i in range(60)]
    assert len(set(colors)) == 60
    assert all(0 <= c <= 255 for rgb in colors for c in rgb)


def test_line_width_scales_with_image_size():
    big = draw_detections(np.zeros((900, 900, 3), np.uint8), [[100, 100, 800, 800]], classes=[0])
    # about 1 px per 300 px: 3 px wide on a 900 px image
    row = np.all(big[450, 95:110] == class_color(0), axis=1)
    assert row.sum() == 3


def test_side_by_side():
    image = _gray(100, 120)
    gt = {"boxes": [[10, 20, 60, 80], [0, 0, 0, 0]], "labels": [2, -1]}
    pred = {"boxes": [[12, 22, 58, 78], [1, 1, 5, 5]], "classes": [2, 0], "scores": [0.8, 0.7],
            "num_detections": 1}
    both = draw_ground_truth_and_predictions(image, gt, pred, class_names=["a", "b", "c"], gap=8)
    band = both.shape[0] - 100
    assert both.shape == (100 + band, 2 * 120 + 8, 3) and band > 0
    assert np.array_equal(both[band + 50, 10], class_color(2))            # gt box, left panel
    assert np.array_equal(both[band + 50, 120 + 8 + 12], class_color(2))  # prediction, right panel
    assert np.all(both[band + 3, 120 + 8 + 1:120 + 8 + 5] == GRAY)        # beyond num_detections


def test_inputs_accepted_and_rejected():
    import tensorflow as tf

    gray = np.full((32, 32), 200, np.uint8)
    assert draw_detections(gray, np.zeros((0, 4))).shape == (32, 32, 3)
    assert draw_detections(tf.constant(_gray(16, 16)), tf.constant([[1.0, 1, 8, 8]])).shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"boxes must have shape \[N, 4\]"):
        draw_detections(gray, [[1, 2, 3]])
    with pytest.raises(ValueError, match="boxes contain NaN"):
        draw_detections(gray, [[1, 2, 3, np.nan]])
    with pytest.raises(ValueError, match="classes must have 1 entries"):
        draw_detections(gray, [[1, 2, 3, 4]], classes=[1, 2])
    with pytest.raises(ValueError, match=r"masks must have shape \[1, 32, 32\]"):
        draw_detections(gray, [[1, 2, 3, 4]], masks=np.ones((1, 8, 8)))
    with pytest.raises(ValueError, match="image must be"):
        draw_detections(np.zeros((4, 4, 5)), [[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="image contains NaN"):
        draw_detections(np.full((4, 4, 3), np.nan), [[1, 2, 3, 4]])
