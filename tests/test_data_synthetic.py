"""The synthetic data set: determinism, exact boxes vs masks, variety, both output formats."""
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from kerasdet.data.images import read_image
from kerasdet.data.masks import mask_bounding_box, masks_for_record
from kerasdet.data.synthetic import BASE_COLORS, SHAPES, make_dataset


def _tree_digest(root):
    digest = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.mark.parametrize("fmt", ["coco", "voc"])
def test_same_seed_gives_byte_identical_files(tmp_path, fmt):
    make_dataset(str(tmp_path / "a"), 12, seed=7, format=fmt)
    make_dataset(str(tmp_path / "b"), 12, seed=7, format=fmt)
    make_dataset(str(tmp_path / "c"), 12, seed=8, format=fmt)
    a, b, c = (_tree_digest(str(tmp_path / n)) for n in "abc")
    assert len(a) > 12 and a == b
    assert a != c


def test_boxes_are_exactly_the_mask_extents(tmp_path):
    ds = make_dataset(str(tmp_path), 30, seed=1, image_size=((64, 96), (80, 128)), num_classes=5)
    sizes = set()
    for record in ds:
        masks = masks_for_record(record)
        image = read_image(ds.image_file(record))
        assert image.shape == (record.height, record.width, 3)
        sizes.add((record.height, record.width))
        for mask, box, label in zip(masks, record.boxes, record.labels):
            np.testing.assert_array_equal(mask_bounding_box(mask), box)
            # The pixels under the mask carry the class colour (jitter 30 + noise 8: within ~60).
            mean = image[mask.astype(bool)].mean(axis=0)
            assert np.abs(mean - np.array(BASE_COLORS[SHAPES[label]])).max() < 60
        # Objects never overlap, so masks are disjoint.
        assert masks.sum(axis=0).max(initial=0) <= 1
    assert len(sizes) > 5 and all(64 <= h <= 96 and 80 <= w <= 128 for h, w in sizes)


def test_variety_of_counts_sizes_and_classes(tmp_path):
    ds = make_dataset(str(tmp_path), 60, seed=2)
    counts = np.array([r.num_objects for r in ds])
    assert counts.min() == 0 and counts.max() == 4 and (counts == 0).sum() >= 3
    boxes = np.concatenate([r.boxes for r in ds])
    labels = np.concatenate([r.labels for r in ds])
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert sides.min() <= 24 and sides.max() >= 56 and sides.max() <= 64
    assert set(labels.tolist()) == {0, 1, 2}
    assert ds.class_names == ["circle", "square", "triangle"]


def test_voc_and_coco_agree(tmp_path):
    coco = make_dataset(str(tmp_path / "coco"), 10, seed=3, format="coco")
    voc = make_dataset(str(tmp_path / "voc"), 10, seed=3, format="voc")
    for a, b in zip(coco, voc):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.labels, b.labels)
        instances = np.asarray(Image.open(tmp_path / "voc" / "SegmentationObject" / f"{b.image_id}.png"))
        for i, box in enumerate(b.boxes):
            np.testing.assert_array_equal(mask_bounding_box(instances == i + 1), box)
        # The VOC reader turns the instance PNG back into the same masks as COCO's RLE.
        np.testing.assert_array_equal(masks_for_record(a), masks_for_record(b))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        make_dataset(str(tmp_path), 1, format="yolo")
    with pytest.raises(ValueError, match="num_classes"):
        make_dataset(str(tmp_path), 1, num_classes=9)
    with pytest.raises(ValueError, match="object_size"):
        make_dataset(str(tmp_path), 1, object_size=(30, 10))


def test_single_object_set_has_one_object_per_image_and_keeps_the_default_stream(tmp_path):
    single = make_dataset(str(tmp_path / "single"), 20, seed=4, min_objects=1, max_objects=1,
                          object_size=(20, 64))
    assert [r.num_objects for r in single] == [1] * 20
    sides = np.concatenate([np.maximum(r.boxes[:, 2] - r.boxes[:, 0], r.boxes[:, 3] - r.boxes[:, 1])
                            for r in single])
    assert sides.min() >= 20 and sides.max() <= 64
    # min_objects=0 draws the same random numbers as before the argument existed
    a = make_dataset(str(tmp_path / "a"), 6, seed=7)
    b = make_dataset(str(tmp_path / "b"), 6, seed=7, min_objects=0)
    assert _tree_digest(str(tmp_path / "a")) == _tree_digest(str(tmp_path / "b"))
    assert [r.num_objects for r in a] == [r.num_objects for r in b]
    with pytest.raises(ValueError, match="min_objects"):
        make_dataset(str(tmp_path / "c"), 1, min_objects=3, max_objects=2)


def test_synthetic_single_data_spec_writes_the_localization_set(tmp_path):
    from kerasdet.data.data_spec import SYNTHETIC_SINGLE_SETTINGS, parse_data_spec

    data = parse_data_spec(f"synthetic-single:{tmp_path}", need_train=False)
    assert data.train is None and len(data.val) == SYNTHETIC_SINGLE_SETTINGS["val_images"]
    assert all(r.num_objects == 1 for r in data.val)
    assert data.class_names == ["circle", "square", "triangle"]
    # read back from the files on the second call, not drawn again
    again = parse_data_spec(f"synthetic-single:{tmp_path}", need_train=False)
    assert [r.boxes.tolist() for r in again.val] == [r.boxes.tolist() for r in data.val]
