"""COCO / VOC readers, image decoding and the bad-input policy, on tiny files the tests write."""
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from kerasdet.data import (BadInputError, BadInputWarning, FatalInputError, load_coco, load_voc,
                           read_image)
from kerasdet.data.masks import masks_for_record, segmentation_to_mask
from kerasdet.data.voc import VOC_CLASSES, discover_class_names


def _save(path, array, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _rle_uncompressed(mask):
    """COCO uncompressed RLE from its definition: column-major run lengths, starting with zeros."""
    flat = mask.T.reshape(-1)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _write_coco(tmp_path, images, annotations, categories=None):
    categories = categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"},
                                {"id": 12, "name": "fox"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return str(path)


@pytest.fixture
def coco_files(tmp_path):
    root = tmp_path / "img"
    rng = np.random.default_rng(0)
    _save(str(root / "a.png"), rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    _save(str(root / "sub" / "b.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    crowd = np.zeros((20, 30), np.uint8)
    crowd[2:9, 4:11] = 1
    images = [{"id": 1, "file_name": "a.png", "width": 30, "height": 20},
              {"id": 5, "file_name": "sub/b.png", "width": 16, "height": 16}]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2.5, 3, 10, 5], "iscrowd": 0,
         "segmentation": [[2.5, 3, 12.5, 3, 12.5, 8, 2.5, 8]]},
        {"id": 2, "image_id": 1, "category_id": 12, "bbox": [4, 2, 7, 7], "iscrowd": 1,
         "segmentation": _rle_uncompressed(crowd)},
        {"id": 3, "image_id": 1, "category_id": 7, "bbox": [20, 10, 5, 6], "iscrowd": 0,
         "segmentation": {"size": [20, 30], "counts": None}},  # replaced below (compressed RLE)
    ]
    from pycocotools import mask as mask_utils

    m3 = np.zeros((20, 30), np.uint8)
    m3[10:16, 20:25] = 1
    rle = mask_utils.encode(np.asfortranarray(m3))
    annotations[2]["segmentation"] = {"size": [20, 30], "counts": rle["counts"].decode()}
    return tmp_path, root, images, annotations, crowd, m3


def test_coco_reader_boxes_labels_masks(coco_files):
    tmp_path, root, images, annotations, crowd, m3 = coco_files
    ds = load_coco(_write_coco(tmp_path, images, annotations), str(root))
    # categories sorted by id: 3 -> 0, 7 -> 1, 12 -> 2
    assert ds.class_names == ["dog", "cat", "fox"]
    assert ds.category_ids == [3, 7, 12]
    assert ds.category_id_to_label(12) == 2 and ds.label_to_category_id(1) == 7
    with pytest.raises(KeyError, match="unknown category id 99"):
        ds.category_id_to_label(99)
    assert len(ds) == 2
    a, b = ds.records
    expected = np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in
                         (ann["bbox"] for ann in annotations)], np.float32)
    np.testing.assert_allclose(a.boxes, expected)
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int32
    np.testing.assert_array_equal(a.labels, [0, 2, 1])
    np.testing.assert_array_equal(a.iscrowd, [False, True, False])
    # An image without annotations is kept (a negative), with empty arrays of the right shapes.
    assert b.image_path == "sub/b.png" and b.boxes.shape == (0, 4) and b.labels.shape == (0,)
    masks = masks_for_record(a)
    assert masks.shape == (3, 20, 30) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[1], crowd)      # uncompressed RLE
    np.testing.assert_array_equal(masks[2], m3)         # compressed RLE
    # Polygon: the rectangle 2.5..12.5 x 3..8 covers columns 3..12 and rows 3..7 (pixel centres).
    ys, xs = np.nonzero(masks[0])
    assert abs(xs.min() - 3) <= 1 and abs(xs.max() - 12) <= 1
    assert abs(ys.min() - 3) <= 1 and abs(ys.max() - 7) <= 1
    assert abs(int(masks[0].sum()) - 50) <= 15


def test_coco_skip_empty_and_no_masks(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    ds = load_coco(_write_coco(tmp_path, images, annotations), str(root), skip_empty=True,
                   load_masks=False)
    assert len(ds) == 1 and ds.records[0].masks is None


def test_coco_unknown_category_error_and_skip(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    annotations[1]["category_id"] = 99
    path = _write_coco(tmp_path, images, annotations)
    with pytest.raises(BadInputError, match=r"image id 1 \(a.png\) annotation 2: unknown category id 99"):
        load_coco(path, str(root))
    with pytest.warns(BadInputWarning, match="1 x unknown category skipped"):
        ds = load_coco(path, str(root), on_bad="skip")
    assert ds.records[0].num_objects == 2
    assert ds.report.as_dict()["unknown category skipped"] == 1


def test_coco_missing_and_corrupt_images(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    images.append({"id": 9, "file_name": "missing.png", "width": 4, "height": 4})
    path = _write_coco(tmp_path, images, annotations)
    with pytest.raises(BadInputError, match=r"image id 9 \(missing.png\).*not found"):
        load_coco(path, str(root))
    with pytest.warns(BadInputWarning, match="missing, unreadable or wrong-size image skipped"):
        ds = load_coco(path, str(root), on_bad="skip")
    assert [r.image_id for r in ds] == [1, 5]
    # Corrupt file: not an image at all.
    (root / "missing.png").write_bytes(b"this is not a png")
    with pytest.raises(BadInputError, match=r"image id 9 \(missing.png\).*cannot read"):
        load_coco(path, str(root))
    # Truncated PNG: the header is fine, the pixel data is not; only "decode" sees it.
    good = tmp_path / "good.png"
    _save(str(good), np.random.default_rng(1).integers(0, 255, (4, 4, 3), dtype=np.uint8))
    (root / "missing.png").write_bytes(good.read_bytes()[:60])
    load_coco(path, str(root), check_images="header")
    with pytest.raises(BadInputError, match=r"image id 9 \(missing.png\).*cannot decode"):
        load_coco(path, str(root), check_images="decode")


def test_coco_size_mismatch_is_an_error(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    images[0]["width"] = 31
    with pytest.raises(BadInputError, match=r"a.png.*20x31.*20x30"):
        load_coco(_write_coco(tmp_path, images, annotations), str(root))


def test_coco_degenerate_outside_and_nan_boxes(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    annotations[0]["bbox"] = [2, 3, 0, 5]          # zero width: dropped
    annotations[1]["bbox"] = [25, 15, 10, 10]      # partly outside 30x20: clipped
    annotations.append({"id": 4, "image_id": 1, "category_id": 3, "bbox": [40, 2, 5, 5]})  # outside
    path = _write_coco(tmp_path, images, annotations)
    with pytest.warns(BadInputWarning) as caught:
        ds = load_coco(path, str(root))
    message = str(caught[0].message)
    assert "1 x degenerate box dropped" in message and "1 x box outside the image dropped" in message
    rec = ds.records[0]
    np.testing.assert_allclose(rec.boxes, [[25, 15, 30, 20], [20, 10, 25, 16]])
    np.testing.assert_array_equal(rec.labels, [2, 1])
    assert len(rec.masks) == 2  # masks follow their boxes
    annotations[2]["bbox"] = [1, float("nan"), 3, 3]
    path = _write_coco(tmp_path, images, annotations)
    for on_bad in ("error", "skip"):
        with pytest.raises(FatalInputError,
                           match=r"image id 1 \(a.png\): object 2 \(annotation 3\) has a non-finite"):
            load_coco(path, str(root), on_bad=on_bad)


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "link.png"])
def test_file_names_escaping_the_root_are_refused(coco_files, name):
    tmp_path, root, images, annotations, *_ = coco_files
    _save(str(tmp_path / "outside.png"), np.zeros((4, 4, 3), np.uint8))
    os.symlink(str(tmp_path / "outside.png"), str(root / "link.png"))
    images[1]["file_name"] = name
    path = _write_coco(tmp_path, images, annotations)
    for on_bad in ("error", "skip"):
        with pytest.raises(FatalInputError, match="image id 5.*(escapes|absolute|outside)"):
            load_coco(path, str(root), on_bad=on_bad)


def test_coco_duplicate_image_id(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    images[1]["id"] = 1
    with pytest.raises(BadInputError, match="duplicate image id 1"):
        load_coco(_write_coco(tmp_path, images, annotations), str(root))


def test_coco_bad_json(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(BadInputError, match="x.json: not valid JSON"):
        load_coco(str(tmp_path / "x.json"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(str(tmp_path / "nope.json"), str(tmp_path))
    with pytest.raises(ValueError, match="on_bad must be one of"):
        load_coco(str(tmp_path / "x.json"), str(tmp_path), on_bad="ignore")


def _voc_tree(tmp_path, objects_xml, filename="000001.jpg", size=(24, 32)):
    root = tmp_path / "VOC"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n")
    _save(str(root / "JPEGImages" / "000001.jpg"),
          np.full((size[0], size[1], 3), 128, np.uint8), quality=90)
    (root / "Annotations" / "000001.xml").write_text(
        f"<annotation><filename>{filename}</filename><size><width>{size[1]}</width>"
        f"<height>{size[0]}</height><depth>3</depth></size>{objects_xml}</annotation>")
    return root


def _obj(name, box, difficult=0):
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
            f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
            "</bndbox></object>")


def test_voc_reader_difficult_and_one_based_coordinates(tmp_path):
    root = _voc_tree(tmp_path, _obj("dog", (1, 1, 10, 5)) + _obj("cat", (5, 6, 32, 24), 1))
    ds = load_voc(str(root), "train")
    rec = ds.records[0]
    # 1-based inclusive (1..10) covers 0-based pixels 0..9 -> continuous [0, 10).
    np.testing.assert_allclose(rec.boxes, [[0, 0, 10, 5], [4, 5, 32, 24]])
    np.testing.assert_array_equal(rec.labels, [ds.class_names.index("dog"), ds.class_names.index("cat")])
    np.testing.assert_array_equal(rec.difficult, [False, True])
    assert ds.num_classes == 20 and rec.image_path == "000001.jpg" and (rec.height, rec.width) == (24, 32)
    assert load_voc(str(root), "train", keep_difficult=False).records[0].num_objects == 1
    custom = load_voc(str(root), "train", class_names=["cat", "dog"])
    np.testing.assert_array_equal(custom.records[0].labels, [1, 0])


def test_voc_instance_masks(tmp_path):
    root = _voc_tree(tmp_path, _obj("dog", (1, 1, 10, 5)) + _obj("unicorn", (2, 2, 4, 4))
                     + _obj("cat", (5, 6, 32, 24)))
    instances = np.zeros((24, 32), np.uint8)
    instances[0:5, 0:10] = 1
    instances[5:24, 4:32] = 3  # XML object 2 (the unicorn, object 1, is skipped)
    instances[5, 4:32] = 255   # VOC's void border counts as background
    _save(str(root / "SegmentationObject" / "000001.png"), instances)
    with pytest.warns(BadInputWarning, match="unknown class"):
        ds = load_voc(str(root), "train", class_names=VOC_CLASSES, on_bad="skip", load_masks=True)
    masks = masks_for_record(ds.records[0])
    np.testing.assert_array_equal(masks[0], instances == 1)
    np.testing.assert_array_equal(masks[1], instances == 3)
    assert load_voc(str(root), "train", class_names=["dog", "unicorn", "cat"]).records[0].masks is None


def test_voc_bad_inputs(tmp_path):
    root = _voc_tree(tmp_path, _obj("unicorn", (1, 1, 4, 4)) + _obj("dog", (3, 3, 2, 8)))
    with pytest.raises(BadInputError, match=r"000001.xml \(image 000001\) object 0: unknown class name "
                                            r"'unicorn'; the class names are \['aeroplane', "):
        load_voc(str(root), "train", class_names=VOC_CLASSES)
    with pytest.warns(BadInputWarning,
                      match=r"degenerate box dropped \(e.g. .*object 1\).*unknown class skipped"):
        ds = load_voc(str(root), "train", class_names=VOC_CLASSES, on_bad="skip")
    assert ds.records[0].num_objects == 0 and len(ds) == 1
    (root / "Annotations" / "000001.xml").write_text("<annotation><filename>")
    with pytest.raises(BadInputError, match="000001.xml.*malformed XML"):
        load_voc(str(root), "train")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        load_voc(str(root), "val")


def test_voc_class_names_come_from_the_data_unless_given(tmp_path):
    root = _voc_tree(tmp_path, _obj("coin", (1, 1, 10, 5)) + _obj("bolt", (5, 6, 32, 24)))
    (root / "Annotations" / "000002.xml").write_text(
        "<annotation><filename>000001.jpg</filename>" + _obj("washer", (2, 2, 9, 9)) + "</annotation>")
    (root / "ImageSets" / "Main" / "val.txt").write_text("000002\n")
    # One split alone, and the union over both (what a run uses for its training and validation sets).
    assert load_voc(str(root), "train").class_names == ["bolt", "coin"]
    names = discover_class_names(str(root), ["train", "val"])
    assert names == ["bolt", "coin", "washer"]
    train, val = (load_voc(str(root), split, class_names=names) for split in ("train", "val"))
    np.testing.assert_array_equal(train.records[0].labels, [1, 0])
    np.testing.assert_array_equal(val.records[0].labels, [2])
    # Names given explicitly fix the order; a name outside them names the file, object and list.
    np.testing.assert_array_equal(load_voc(str(root), "train", class_names=["coin", "bolt"]).records[0].labels,
                                  [0, 1])
    with pytest.raises(BadInputError, match=r"000002.xml \(image 000002\) object 0: unknown class name "
                                            r"'washer'; the class names are \['coin', 'bolt'\]"):
        load_voc(str(root), "val", class_names=["coin", "bolt"])
    # A set using only Pascal VOC names keeps VOC's 20 classes and their ids.
    voc = _voc_tree(tmp_path / "voc", _obj("dog", (1, 1, 10, 5)))
    assert discover_class_names(str(voc), "train") == list(VOC_CLASSES)


def test_voc_missing_image_error_and_skip(tmp_path):
    root = _voc_tree(tmp_path, _obj("dog", (1, 1, 10, 5)))
    with open(root / "ImageSets" / "Main" / "train.txt", "a") as f:
        f.write("000002\n")  # listed, but neither its XML nor its image exist
    with pytest.raises(BadInputError, match=r"000002.xml \(image 000002\): annotation file not found"):
        load_voc(str(root), "train")
    (root / "Annotations" / "000002.xml").write_text(
        "<annotation><filename>000002.jpg</filename></annotation>")
    with pytest.raises(BadInputError, match=r"image 000002.*image file not found"):
        load_voc(str(root), "train")
    with pytest.warns(BadInputWarning, match="1 x missing or unreadable image or annotation skipped"):
        ds = load_voc(str(root), "train", on_bad="skip")
    assert [r.image_id for r in ds] == ["000001"]
    assert ds.report.as_dict() == {"missing or unreadable image or annotation skipped": 1}


def test_voc_nan_and_escape(tmp_path):
    root = _voc_tree(tmp_path, _obj("dog", (1, "nan", 4, 4)))
    with pytest.raises(FatalInputError, match="000001.*non-finite"):
        load_voc(str(root), "train", on_bad="skip")
    root2 = _voc_tree(tmp_path / "b", "", filename="../../secret.jpg")
    with pytest.raises(FatalInputError, match="escapes the image root"):
        load_voc(str(root2), "train", on_bad="skip")


def test_read_image_kinds(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    to8 = lambda a: np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)  # noqa: E731 (v*255/65535)
    cases = {
        "rgb.png": (rgb, rgb), "gray.png": (gray, np.stack([gray] * 3, -1)),
        "rgba.png": (rgba, rgba[..., :3]), "g16.png": (g16, np.stack([to8(g16)] * 3, -1)),
    }
    for name, (stored, expected) in cases.items():
        Image.fromarray(stored).save(tmp_path / name)
        out = read_image(str(tmp_path / name))
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3), name
        np.testing.assert_array_equal(out, expected, err_msg=name)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")
    np.testing.assert_array_equal(read_image(str(tmp_path / "rgb16.tif")), to8(rgb16))
    tifffile.imwrite(tmp_path / "gray.tiff", gray)
    np.testing.assert_array_equal(read_image(str(tmp_path / "gray.tiff")), np.stack([gray] * 3, -1))
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(str(tmp_path / "rgba.tif")), rgba[..., :3])
    tifffile.imwrite(tmp_path / "float.tif", rgb.astype(np.float32) / 255.0, photometric="rgb")
    np.testing.assert_array_equal(read_image(str(tmp_path / "float.tif")), rgb)
    smooth = np.broadcast_to(np.linspace(40, 200, 7)[None, :, None], (5, 7, 3)).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "rgb.jpg", quality=95)
    jpg = read_image(str(tmp_path / "rgb.jpg"))
    assert jpg.shape == (5, 7, 3) and np.abs(jpg.astype(int) - smooth).mean() < 8  # lossy
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(BadInputError, match="bad.png: cannot decode"):
        read_image(str(tmp_path / "bad.png"))
    with pytest.raises(BadInputError, match="image file not found"):
        read_image(str(tmp_path / "none.png"))


def test_segmentation_errors_name_the_object():
    with pytest.raises(BadInputError, match="img 3 object 1: RLE size"):
        segmentation_to_mask({"size": [4, 4], "counts": [16]}, 5, 5, "img 3 object 1")
    with pytest.raises(BadInputError, match="unsupported segmentation"):
        segmentation_to_mask(42, 5, 5)
    assert segmentation_to_mask([[1, 1, 2, 2]], 4, 4).sum() == 0  # fewer than 3 points


def test_no_warning_for_clean_data(coco_files):
    tmp_path, root, images, annotations, *_ = coco_files
    path = _write_coco(tmp_path, images, annotations)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco(path, str(root))
