"""TFRecord writer / reader round trip, and the pipeline fed from TFRecord."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data import DetectionDataset, DetectionRecord
from kerasdet.data.images import read_image
from kerasdet.data.masks import masks_for_record
from kerasdet.data.pipeline import build_dataset
from kerasdet.data.synthetic import make_dataset
from kerasdet.data.tfrecord import read_tfrecord, write_tfrecord
from mask_reference import resample_reference


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfr")
    ds = make_dataset(str(root), 7, seed=5, image_size=((30, 50), (30, 50)), object_size=(6, 20))
    assert min(r.num_objects for r in ds) == 0  # an image without objects takes part
    return ds


def _np(sample):
    return tf.nest.map_structure(lambda t: t.numpy(), sample)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_with_masks(coco, tmp_path, num_shards):
    files = write_tfrecord(coco, str(tmp_path / "train.tfrecord"), num_shards=num_shards)
    assert len(files) == num_shards
    samples = [_np(s) for s in read_tfrecord(files, with_masks=True, mask_size=20)]
    assert sorted(s["image_index"] for s in samples) == list(range(len(coco)))
    for s in samples:
        rec = coco.records[s["image_index"]]
        np.testing.assert_array_equal(s["image"], read_image(coco.image_file(rec)))  # PNG: lossless
        np.testing.assert_array_equal(s["boxes"], rec.boxes)
        np.testing.assert_array_equal(s["labels"], rec.labels)
        np.testing.assert_array_equal(s["difficult"], rec.difficult)
        np.testing.assert_array_equal(s["iscrowd"], rec.iscrowd)
        # The stored PNGs come back as each object's mask cropped to its box on a 20 x 20 grid.
        full = masks_for_record(rec)
        assert s["masks"].shape == (rec.num_objects, 20, 20)
        for grid, mask, box in zip(s["masks"], full, rec.boxes):
            np.testing.assert_allclose(grid, resample_reference(mask, (0, 0, rec.width, rec.height),
                                                                box, 20), atol=2e-3)
        assert s["boxes"].dtype == np.float32 and s["labels"].dtype == np.int32


def test_pipeline_from_tfrecord_equals_pipeline_from_files(coco, tmp_path):
    files = write_tfrecord(coco, str(tmp_path / "x.tfrecord"))
    kwargs = dict(batch_size=3, min_size=32, max_size=48, stride=16, with_masks=True)
    n = coco.max_objects()
    a = [_np(b) for b in build_dataset(coco, max_boxes=n, **kwargs)]
    b = [_np(b) for b in build_dataset(files, max_boxes=n, **kwargs)]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        tf.nest.map_structure(np.testing.assert_array_equal, x, y)


def test_tiff_and_difficult_survive(tmp_path):
    import tifffile

    rgb16 = np.random.default_rng(0).integers(0, 65536, (6, 8, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", rgb16, photometric="rgb")
    rec = DetectionRecord("a", "a.tif", 8, 6, [[1, 2, 3, 4], [0, 0, 8, 6]], [1, 0],
                          difficult=[True, False], iscrowd=[False, True])
    ds = DetectionDataset([rec], ["x", "y"], str(tmp_path))
    files = write_tfrecord(ds, str(tmp_path / "t.tfrecord"))
    sample = _np(next(iter(read_tfrecord(files))))
    np.testing.assert_array_equal(sample["image"], read_image(str(tmp_path / "a.tif")))
    np.testing.assert_array_equal(sample["difficult"], [True, False])
    np.testing.assert_array_equal(sample["iscrowd"], [False, True])
    with pytest.raises(tf.errors.InvalidArgumentError, match="written without masks"):
        next(iter(read_tfrecord(files, with_masks=True)))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tfrecord"):
        read_tfrecord(str(tmp_path / "nope.tfrecord"))
