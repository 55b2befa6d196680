"""Box-aware augmentation: boxes must stay on their objects (checked through masks and pixels)."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data import augment as aug
from kerasdet.data.mask_grids import crop_masks_to_boxes
from kerasdet.data.masks import mask_bounding_box
from kerasdet.evaluation import paste_masks
from mask_reference import boundary_pixels, resample_reference

RECT_COLOR = (250.0, 10.0, 10.0)
DISK_COLOR = (10.0, 250.0, 10.0)


GRID = 32  # mask grid size of the samples


def _full_masks(height=40, width=60):
    """Image-sized masks of a rectangle and a disk: [2, height, width] uint8."""
    rect = np.zeros((height, width), np.uint8)
    rect[5:17, 8:30] = 1
    yy, xx = np.mgrid[0:height, 0:width]
    disk = (((yy + 0.5 - 27) ** 2 + (xx + 0.5 - 45) ** 2) <= 64).astype(np.uint8)
    return np.stack([rect, disk])


def _sample(height=40, width=60):
    """Gray image with a red rectangle and a green disk; exact boxes from the drawing and the
    masks as the pipeline carries them (GRID x GRID grids over the boxes)."""
    image = np.full((height, width, 3), 100.0, np.float32)
    masks = _full_masks(height, width)
    image[masks[0].astype(bool)] = RECT_COLOR
    image[masks[1].astype(bool)] = DISK_COLOR
    boxes = np.stack([mask_bounding_box(m) for m in masks])
    return {
        "image": tf.constant(image), "masks": crop_masks_to_boxes(masks, boxes, GRID),
        "boxes": tf.constant(boxes),
        "labels": tf.constant([0, 1], tf.int32), "difficult": tf.constant([False, True]),
        "iscrowd": tf.constant([False, False]), "image_index": tf.constant(7),
    }


def _np(sample):
    return {k: v.numpy() for k, v in sample.items()}


def _check_boxes_on_objects(out, exact=True):
    """Each box is its pasted grid's extent, the pasted pixels have the object's colour, labels
    follow."""
    h, w = out["image"].shape[:2]
    assert out["masks"].shape == (len(out["labels"]), GRID, GRID)
    for box, grid, label in zip(out["boxes"], out["masks"], out["labels"]):
        mask = paste_masks(grid[None], box[None], (h, w))[0] >= 0.5
        assert mask.any()
        extent = mask_bounding_box(mask)
        if exact:
            np.testing.assert_allclose(extent, box, atol=1e-4)
        else:  # a clipped disk's mask can be smaller than its clipped box, never larger
            assert (extent[:2] >= box[:2] - 1e-4).all() and (extent[2:] <= box[2:] + 1e-4).all()
        color = RECT_COLOR if label == 0 else DISK_COLOR
        # Resampling may move the pasted edge by a pixel: nearly all pasted pixels are the object.
        on_object = np.all(np.abs(out["image"][mask] - color) < 1.0, axis=-1).mean()
        assert on_object > 0.9, on_object
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h


def test_horizontal_flip_matches_numpy():
    sample = _sample()
    out = _np(aug.horizontal_flip(sample))
    ref = _np(sample)
    w = ref["image"].shape[1]
    np.testing.assert_array_equal(out["image"], ref["image"][:, ::-1])
    np.testing.assert_array_equal(out["masks"], ref["masks"][:, :, ::-1])
    expected = np.stack([w - ref["boxes"][:, 2], ref["boxes"][:, 1], w - ref["boxes"][:, 0],
                         ref["boxes"][:, 3]], -1)
    np.testing.assert_allclose(out["boxes"], expected)
    _check_boxes_on_objects(out)
    assert out["image_index"] == 7


def test_random_flip_probability_and_determinism():
    sample = _sample()
    always = _np(aug.random_flip(sample, [1, 2], probability=1.0))
    never = _np(aug.random_flip(sample, [1, 2], probability=0.0))
    np.testing.assert_array_equal(always["image"], _np(sample)["image"][:, ::-1])
    np.testing.assert_array_equal(never["image"], _np(sample)["image"])
    flips = [bool((aug.random_flip(sample, [s, 0])["boxes"].numpy() != sample["boxes"].numpy()).any())
             for s in range(40)]
    assert 8 <= sum(flips) <= 32  # about half
    assert flips == [bool((aug.random_flip(sample, [s, 0])["boxes"].numpy()
                           != sample["boxes"].numpy()).any()) for s in range(40)]


def test_expand_keeps_boxes_on_objects_and_fills_canvas():
    sample = _sample()
    fill = (1.0, 2.0, 3.0)
    sizes = set()
    for s in range(6):
        out = _np(aug.random_expand(sample, [s, 5], max_ratio=3.0, probability=1.0, fill_value=fill))
        h, w = out["image"].shape[:2]
        sizes.add((h, w))
        assert 40 <= h <= 120 and 60 <= w <= 180
        _check_boxes_on_objects(out)
        is_fill = (out["image"] == np.array(fill, np.float32)).all(-1)
        assert is_fill.sum() == h * w - 40 * 60  # the original image is pasted whole
    assert len(sizes) > 3


def _iou_np(window, boxes):
    """IoU of one box against many, from the definition (continuous coordinates)."""
    ix = np.clip(np.minimum(window[2], boxes[:, 2]) - np.maximum(window[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(window[3], boxes[:, 3]) - np.maximum(window[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(window) + area(boxes) - inter)


@pytest.mark.parametrize("min_iou", [0.1, 0.3, 0.5, 0.7, 0.9, -1.0])
def test_ssd_window_meets_its_constraints(min_iou):
    # One large and one small object, so that even a 0.9 IoU window exists within the scale range.
    boxes = np.array([[10, 5, 45, 38], [2, 2, 12, 10]], np.float32)
    found_any = 0
    for s in range(12):
        window, found = aug.sample_ssd_window(tf.constant(boxes), 40, 60, [s, 11], min_iou)
        window, found = window.numpy(), bool(found)
        if not found:
            continue
        found_any += 1
        cw, ch = window[2] - window[0], window[3] - window[1]
        assert np.array_equal(window, np.floor(window))
        assert 0 <= window[0] and window[2] <= 60 and 0 <= window[1] and window[3] <= 40
        assert 0.3 * 60 - 1 <= cw <= 60 and 0.3 * 40 - 1 <= ch <= 40 and 0.5 <= cw / ch <= 2.0
        assert _iou_np(window, boxes).max() >= min_iou - 1e-6
        cx, cy = boxes[:, 0::2].mean(1), boxes[:, 1::2].mean(1)
        assert ((cx > window[0]) & (cx < window[2]) & (cy > window[1]) & (cy < window[3])).any()
    assert found_any >= (1 if min_iou > 0.6 else 4)


def test_ssd_window_without_boxes():
    empty = tf.zeros([0, 4])
    assert not bool(aug.sample_ssd_window(empty, 40, 60, [1, 1], 0.3)[1])
    assert bool(aug.sample_ssd_window(empty, 40, 60, [1, 1], -1.0)[1])


def test_crop_matches_numpy_reference():
    sample = _sample()
    window = np.array([20, 8, 50, 33], np.float32)  # cuts the rectangle; disk centre (45, 27) inside
    out = _np(aug.crop(sample, tf.constant(window)))
    ref = _np(sample)
    np.testing.assert_array_equal(out["image"], ref["image"][8:33, 20:50])
    boxes = ref["boxes"]
    centers = np.stack([boxes[:, 0::2].mean(1), boxes[:, 1::2].mean(1)], -1)
    keep = ((centers > window[:2]) & (centers < window[2:])).all(1)
    expected = boxes[keep] - np.tile(window[:2], 2)
    expected[:, 0::2] = np.clip(expected[:, 0::2], 0, 30)
    expected[:, 1::2] = np.clip(expected[:, 1::2], 0, 25)
    np.testing.assert_allclose(out["boxes"], expected)
    np.testing.assert_array_equal(out["labels"], ref["labels"][keep])
    np.testing.assert_array_equal(out["difficult"], ref["difficult"][keep])
    _check_boxes_on_objects(out, exact=False)


def test_ssd_random_crop_keeps_boxes_on_objects():
    sample = _sample()
    shapes = set()
    for s in range(20):
        out = _np(aug.ssd_random_crop(sample, [s, 3]))
        shapes.add(out["image"].shape)
        _check_boxes_on_objects(out, exact=False)
    assert len(shapes) > 3


def test_clip_and_drop_empty():
    sample = _sample()
    sample = dict(sample, boxes=tf.constant([[-5.0, 2.0, 10.0, 50.0], [70.0, 1.0, 80.0, 5.0]]))
    out = _np(aug.clip_and_drop_empty(sample))
    np.testing.assert_allclose(out["boxes"], [[0, 2, 10, 40]])
    np.testing.assert_array_equal(out["labels"], [0])
    assert out["masks"].shape[0] == 1


def test_photometric_distortion():
    sample = _sample()
    out = aug.photometric_distort(sample, [4, 4])
    again = aug.photometric_distort(sample, [4, 4])
    np.testing.assert_array_equal(out["image"].numpy(), again["image"].numpy())
    np.testing.assert_array_equal(out["boxes"].numpy(), sample["boxes"].numpy())
    changed = 0
    for s in range(6):
        img = aug.photometric_distort(sample, [s, 9])["image"].numpy()
        assert img.min() >= 0 and img.max() <= 255
        changed += not np.allclose(img, sample["image"].numpy())
    assert changed >= 3
    # Brightness alone: a uniform shift of at most 32 levels (where nothing clips).
    only = aug.photometric_distort(sample, [2, 2], contrast_range=(1, 1 + 1e-7),
                                   saturation_range=(1, 1 + 1e-7),
                                   hue_delta_degrees=0.0, probability=1.0)["image"].numpy()
    diff = only - sample["image"].numpy()
    unclipped = (only > 0.5) & (only < 254.5)
    assert np.ptp(diff[unclipped]) < 0.1 and abs(diff[unclipped].mean()) <= 32.01


def test_resolve_augment():
    assert aug.resolve_augment("ssd") == ("photometric", "expand", "crop", "flip")
    assert aug.resolve_augment(None) == ()
    with pytest.raises(ValueError, match="unknown augmentation step 'rotate'"):
        aug.resolve_augment(["flip", "rotate"])
    with pytest.raises(ValueError, match="augment must be one of"):
        aug.resolve_augment("mosaic")


def _grids_of(full, boxes):
    """Reference grids cut from image-sized masks at `boxes` (numpy, from the definition)."""
    h, w = full.shape[1:]
    return np.stack([resample_reference(m, (0, 0, w, h), box, GRID) for m, box in zip(full, boxes)])


def test_mask_grids_follow_flip_expand_and_crop_as_full_masks_would():
    # Each geometric step on (box, grid) pairs must give the grids that cutting the same step's
    # image-sized masks at the new boxes gives.
    sample, full = _sample(), _full_masks()
    np.testing.assert_allclose(sample["masks"], _grids_of(full, sample["boxes"].numpy()), atol=2e-3)

    flipped = _np(aug.horizontal_flip(sample))
    np.testing.assert_allclose(flipped["masks"], _grids_of(full[:, :, ::-1], flipped["boxes"]),
                               atol=2e-3)

    expanded = _np(aug.random_expand(sample, [3, 1], probability=1.0))
    ox, oy = (expanded["boxes"] - sample["boxes"].numpy())[0, :2].astype(int)
    canvas = np.zeros((2,) + expanded["image"].shape[:2], np.uint8)
    canvas[:, oy:oy + 40, ox:ox + 60] = full
    assert canvas.shape[1:] != full.shape[1:]
    np.testing.assert_allclose(expanded["masks"], _grids_of(canvas, expanded["boxes"]), atol=2e-3)

    # A window that cuts both objects: their grids are re-cropped to the parts kept.
    x1, y1, x2, y2 = 15, 10, 50, 30
    cropped = _np(aug.crop(sample, tf.constant([x1, y1, x2, y2]), center_rule=False))
    np.testing.assert_allclose(cropped["boxes"], [[0, 0, 15, 7], [22, 9, 35, 20]])
    expected = _grids_of(full[:, y1:y2, x1:x2], cropped["boxes"])
    # Re-sampling the grid rather than the mask: values agree to within the bilinear rounding at
    # the object's edge, and the binarized grids only differ there.
    differ = (cropped["masks"] >= 0.5) != (expected >= 0.5)
    edge = np.stack([boundary_pixels(e >= 0.5) for e in expected])
    print(f"crop: max |grid - reference| {np.abs(cropped['masks'] - expected).max():.3f}, "
          f"{differ.mean():.2%} of cells flip, all on the edge: {not (differ & ~edge).any()}")
    assert not (differ & ~edge).any() and differ.mean() < 0.02
