"""Issue 18, bad input: every bad record listed, corrupt pixels named during the run, decompression
bombs refused, symlink escapes, the instance cap. Tiny files written by the tests (64 px)."""
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from kerasdet.data import BadInputError, BadInputWarning, FatalInputError, load_coco, load_voc
from kerasdet.data import images as image_module
from kerasdet.data.images import read_image
from kerasdet.data.records import DetectionDataset, DetectionRecord
from kerasdet.data.voc import write_voc_annotation


def _png(path, seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def _corrupt_pixels(path):
    """Valid signature and IHDR (the header check passes), zeroed compressed pixel data."""
    data = bytearray(open(path, "rb").read())
    data[100:140] = b"\0" * 40
    open(path, "wb").write(bytes(data))


def _bomb_png(path, width=50000, height=50000):
    """A PNG of a few hundred bytes whose IHDR declares width x height."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    data += chunk(b"IEND", b"")
    with open(path, "wb") as handle:
        handle.write(data)


def _coco(tmp_path, n=5):
    root = tmp_path / "img"
    images, annotations = [], []
    for i in range(n):
        _png(str(root / f"{i}.png"), i)
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        annotations.append({"id": 100 + i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20]})
    return root, images, annotations


def _write_json(tmp_path, images, annotations, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return str(path)


# ----------------------------------------------------------------------------- (1) every bad record
def test_coco_lists_every_bad_record_and_skip_counts_them(tmp_path):
    root, images, annotations = _coco(tmp_path)
    os.remove(root / "1.png")                                   # missing image
    (root / "2.png").write_bytes(b"not an image")               # not an image
    images[3]["width"] = 65                                     # size mismatch
    annotations[4]["category_id"] = 9                           # unknown category
    annotations.append({"id": 999, "image_id": 77, "category_id": 1, "bbox": [0, 0, 1, 1]})
    path = _write_json(tmp_path, images, annotations)
    with pytest.raises(BadInputError) as caught:
        load_coco(path, str(root))
    message = str(caught.value)
    assert "5 bad record(s)" in message and "--on-bad skip" in message
    for needle in ("annotation 999", "unknown image id 77", "image id 1 (1.png)", "not found",
                   "image id 2 (2.png)", "image id 3 (3.png)", "64x65", "image id 4 (4.png) annotation 104",
                   "unknown category id 9"):
        assert needle in message, needle
    assert path in message
    with pytest.warns(BadInputWarning):
        ds = load_coco(path, str(root), on_bad="skip")
    assert [r.image_id for r in ds.records] == [0, 4]
    listed = ds.report.describe()
    assert "3 x missing, unreadable or wrong-size image skipped" in listed
    assert "1 x unknown category skipped" in listed and "1 x annotation of an unknown image" in listed
    assert "image id 2 (2.png)" in listed


def test_voc_lists_every_bad_record(tmp_path):
    root = tmp_path / "VOC"
    ids = [f"{i:06d}" for i in range(4)]
    for i, image_id in enumerate(ids):
        _png(str(root / "JPEGImages" / f"{image_id}.png"), i)
        os.makedirs(root / "Annotations", exist_ok=True)
        write_voc_annotation(str(root / "Annotations" / f"{image_id}.xml"), f"{image_id}.png", 64, 64,
                             [{"name": "dog", "box": (2, 2, 30, 30)}])
    os.makedirs(root / "ImageSets" / "Main")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids + ["000009"]))
    (root / "Annotations" / "000001.xml").write_text("<annotation><object>")
    os.remove(root / "JPEGImages" / "000002.png")
    with pytest.raises(BadInputError) as caught:
        load_voc(str(root), "train", class_names=["dog"])
    message = str(caught.value)
    assert "3 bad record(s)" in message
    for needle in ("000001.xml (image 000001): malformed XML", "image 000002", "image file not found",
                   "000009.xml (image 000009): annotation file not found"):
        assert needle in message, needle
    with pytest.warns(BadInputWarning):
        ds = load_voc(str(root), "train", class_names=["dog"], on_bad="skip")
    assert [r.image_id for r in ds.records] == ["000000", "000003"]
    assert "3 x missing or unreadable image or annotation skipped" in ds.report.describe()


# ----------------------------------------------------------------------------- (2) decode in the run
def _dataset_with_corrupt_pixels(tmp_path):
    root = tmp_path / "img"
    records = []
    for i in range(5):
        _png(str(root / f"{i}.png"), i)
        records.append(DetectionRecord(i, f"{i}.png", 64, 64, [[2, 2, 30, 30]], [0]))
    _corrupt_pixels(str(root / "2.png"))
    image_module.check_image(str(root / "2.png"), (64, 64), "header", "x")  # the header check passes
    return DetectionDataset(records, ["thing"], str(root))


def test_corrupt_pixels_are_named_or_skipped_and_counted(tmp_path):
    import tensorflow as tf

    from kerasdet.data.pipeline import build_dataset, named_input_error

    dataset = _dataset_with_corrupt_pixels(tmp_path)
    ds = build_dataset(dataset, 2, image_size=64)
    with pytest.raises(tf.errors.OpError) as caught:
        for _ in ds:
            pass
    named = named_input_error(caught.value)
    assert isinstance(named, BadInputError)
    assert "record 2 (image id 2" in str(named) and "2.png" in str(named)
    assert "cannot decode" in str(named)

    ds = build_dataset(dataset, 2, image_size=64, training=True, seed=1, on_bad="skip",
                       repeat=True, augment=None)
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        seen = [i for batch in ds.take(6) for i in batch["image_index"].numpy().tolist()]
    assert 2 not in seen and set(seen) == {0, 1, 3, 4}  # three epochs of the four good ones
    assert dataset.report.counts["undecodable image skipped in the pipeline"] == 1  # once, not per epoch
    assert "2.png" in dataset.report.describe()
    assert any("2.png" in str(w.message) for w in caught_warnings)


def test_train_model_raises_the_named_error(tmp_path):
    """A real (tiny) fit: the pipeline's decode failure surfaces as the BadInputError itself."""
    import keras

    from kerasdet.engine.loop import named_input_error
    from kerasdet.data.pipeline import build_dataset

    dataset = _dataset_with_corrupt_pixels(tmp_path)
    ds = build_dataset(dataset, 5, image_size=64).map(lambda b: (b["images"], b["images"][:, :1, :1, :1]))
    model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Conv2D(1, 64)])
    model.compile("sgd", "mse")
    import tensorflow as tf

    with pytest.raises(tf.errors.OpError) as caught:
        model.fit(ds, epochs=1, verbose=0)
    assert "2.png" in str(named_input_error(caught.value))


# ----------------------------------------------------------------------------- (3) bombs
def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.png")
    _bomb_png(path)
    assert os.path.getsize(path) < 200
    with pytest.raises(BadInputError, match=r"bomb.png: the image declares 50000 x 50000 .*"
                                            r"more than the limit of 100,000,000.*--max-image-pixels"):
        read_image(path)
    with pytest.raises(BadInputError, match="bomb.png: the image declares"):
        image_module.check_image(path, None, "header", path)
    # The limit is the user's: an argument, the environment variable, or set_max_image_pixels.
    small = str(tmp_path / "small.png")
    _png(small)
    with pytest.raises(BadInputError, match="limit of 1,000"):
        read_image(small, max_image_pixels=1000)
    monkeypatch.setenv("KERASDET_MAX_IMAGE_PIXELS", "4000")
    with pytest.raises(BadInputError, match="limit of 4,000"):
        read_image(small)
    monkeypatch.setenv("KERASDET_MAX_IMAGE_PIXELS", "5000")
    assert read_image(small).shape == (64, 64, 3)
    image_module.set_max_image_pixels(10)
    try:
        with pytest.raises(BadInputError, match="limit of 10"):
            read_image(small)
    finally:
        image_module.set_max_image_pixels(None)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own setting is left as it was


def test_bomb_in_a_data_set_is_named_by_the_readers(tmp_path):
    root, images, annotations = _coco(tmp_path, 2)
    _bomb_png(str(root / "1.png"))
    images[1].update(width=50000, height=50000)
    path = _write_json(tmp_path, images, annotations)
    with pytest.raises(BadInputError, match=r"image id 1 \(1.png\): the image declares 50000 x 50000"):
        load_coco(path, str(root))
    with pytest.raises(BadInputError, match="image id 1 .*declares 50000"):
        load_coco(path, str(root), check_images="none")  # the JSON's size alone is refused
    with pytest.warns(BadInputWarning):
        ds = load_coco(path, str(root), on_bad="skip")
    assert [r.image_id for r in ds.records] == [0]
    # A hand-built data set declaring a huge image never reaches the decoder.
    from kerasdet.data.pipeline import build_dataset

    big = DetectionDataset([DetectionRecord(0, "1.png", 50000, 50000, [[0, 0, 5, 5]], [0])], ["t"],
                           str(root))
    with pytest.raises(BadInputError, match="record 0 .*declares 50000 x 50000"):
        build_dataset(big, 1, image_size=64)


# ----------------------------------------------------------------------------- (7) symlinks
@pytest.mark.parametrize("how", ["file", "directory", "chain"])
def test_symlink_escapes_are_refused_voc_and_coco(tmp_path, how):
    outside = tmp_path / "secret"
    _png(str(outside / "x.png"))
    root = tmp_path / "VOC"
    images = root / "JPEGImages"
    os.makedirs(images)
    if how == "file":
        os.symlink(outside / "x.png", images / "a.png")
        name = "a.png"
    elif how == "directory":
        os.symlink(outside, images / "sub")
        name = "sub/x.png"
    else:  # a link to a link inside the root that leaves it
        os.symlink(outside / "x.png", images / "hop.png")
        os.symlink(images / "hop.png", images / "a.png")
        name = "a.png"
    os.makedirs(root / "Annotations")
    os.makedirs(root / "ImageSets" / "Main")
    write_voc_annotation(str(root / "Annotations" / "a.xml"), name, 64, 64,
                         [{"name": "dog", "box": (2, 2, 30, 30)}])
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    for on_bad in ("error", "skip"):
        with pytest.raises(FatalInputError, match="outside the image root"):
            load_voc(str(root), "train", class_names=["dog"], on_bad=on_bad)
        path = _write_json(tmp_path, [{"id": 1, "file_name": name, "width": 64, "height": 64}], [])
        with pytest.raises(FatalInputError, match=r"image id 1 .*outside the image root"):
            load_coco(path, str(images), on_bad=on_bad)


def test_symlink_inside_the_root_is_fine(tmp_path):
    root, images, annotations = _coco(tmp_path, 1)
    os.symlink(root / "0.png", root / "alias.png")
    images[0]["file_name"] = "alias.png"
    ds = load_coco(_write_json(tmp_path, images, annotations), str(root))
    assert ds.records[0].image_path == "alias.png"


# ----------------------------------------------------------------------------- (10) instance cap
def test_thousands_of_boxes_are_capped_with_a_counted_warning(tmp_path):
    from kerasdet.data import pipeline

    _png(str(tmp_path / "a.png"))
    _png(str(tmp_path / "b.png"), 1)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (5000, 2))
    boxes = np.concatenate([xy, xy + 10], axis=1)
    records = [DetectionRecord(0, "a.png", 64, 64, boxes, np.zeros(5000)),
               DetectionRecord(1, "b.png", 64, 64, [[1, 1, 9, 9]], [0])]
    dataset = DetectionDataset(records, ["t"], str(tmp_path))
    with pytest.warns(BadInputWarning, match=r"1 image\(s\) have more than max_boxes=1000 objects \(up to "
                                             r"5000; e.g. record 0 \(a.png: 5000\)\)"):
        ds = pipeline.build_dataset(dataset, 2, image_size=64)
    batch = next(iter(ds))
    assert batch["bounding_boxes"]["boxes"].shape == (2, 1000, 4)
    assert int((batch["bounding_boxes"]["labels"][0] >= 0).numpy().sum()) == 1000
    with pytest.warns(BadInputWarning, match="max_boxes=3"):
        pipeline.build_dataset(dataset, 2, image_size=64, max_boxes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = pipeline.build_dataset(dataset, 2, image_size=64, max_boxes=5000)  # raised: no cut
    assert next(iter(ds))["bounding_boxes"]["boxes"].shape == (2, 5000, 4)


# ----------------------------------------------------------------------------- (9) TFRecord files
@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_corrupt_tfrecord_names_the_file_and_the_record(tmp_path, damage):
    import tensorflow as tf

    from kerasdet.data.pipeline import build_dataset, named_input_error
    from kerasdet.data.tfrecord import check_tfrecord, read_tfrecord, write_tfrecord

    records = []
    for i in range(3):
        _png(str(tmp_path / f"{i}.png"), i)
        records.append(DetectionRecord(i, f"{i}.png", 64, 64, [[2, 2, 30, 30]], [0]))
    dataset = DetectionDataset(records, ["thing"], str(tmp_path))
    good, bad = (str(tmp_path / f"{n}.tfrecord") for n in ("good", "bad"))
    write_tfrecord(dataset, good)
    write_tfrecord(dataset, bad)
    data = bytearray(open(bad, "rb").read())
    sizes = [os.path.getsize(str(tmp_path / f"{i}.png")) for i in range(3)]
    if damage == "truncated":
        data = data[:len(data) - 40]  # the third record loses its tail
    else:
        data[len(data) - sizes[2] // 2 - 200] ^= 0xFF  # a byte inside the third record's image
    open(bad, "wb").write(bytes(data))
    assert check_tfrecord(good) == 3
    with pytest.raises(BadInputError, match=r"bad.tfrecord: TFRecord record 2 \(0-based; 2 good records"):
        check_tfrecord(bad)
    with pytest.raises(BadInputError, match=r"bad.tfrecord: TFRecord record 2"):
        read_tfrecord([good, bad], verify=True)
    ds = build_dataset([good, bad], 2, image_size=64)
    with pytest.raises(tf.errors.OpError) as caught:
        for _ in ds:
            pass
    assert "bad.tfrecord" not in str(caught.value)  # what TensorFlow says alone
    named = named_input_error(caught.value)
    assert named is not None and "bad.tfrecord: TFRecord record 2" in str(named)


def test_data_spec_lists_the_bad_records_of_both_splits(tmp_path):
    from kerasdet.data.data_spec import parse_data_spec

    for split in ("train", "val"):
        folder = tmp_path / split
        os.makedirs(folder)
        root, images, annotations = _coco(folder, 3)
        os.remove(root / "1.png")
        _write_json(folder, images, annotations, name="instances.json")
    spec = f"coco:{tmp_path}/{{split}}/instances.json:{tmp_path}/{{split}}/img"
    with pytest.raises(BadInputError) as caught:
        parse_data_spec(spec)
    message = str(caught.value)
    assert "train/instances.json: 1 bad record(s)" in message
    assert "val/instances.json: 1 bad record(s)" in message
    with pytest.warns(BadInputWarning):
        data = parse_data_spec(spec, on_bad="skip")
    assert len(data.train) == 2 and len(data.val) == 2


def test_an_undecodable_image_inside_a_tfrecord_is_named(tmp_path):
    import tensorflow as tf

    from kerasdet.data.pipeline import build_dataset, named_input_error
    from kerasdet.data.tfrecord import write_tfrecord

    dataset = _dataset_with_corrupt_pixels(tmp_path)  # 2.png: valid header, corrupt pixels
    path = str(tmp_path / "set.tfrecord")
    write_tfrecord(dataset, path)
    with pytest.raises(tf.errors.OpError) as caught:
        for _ in build_dataset(path, 2, image_size=64):
            pass
    named = named_input_error(caught.value)
    assert named is not None and "set.tfrecord: TFRecord record 2 (image/filename '2.png')" in str(named)
