"""Issue 18: property-based tests of the VOC XML and COCO JSON readers. Malformed, truncated,
mistyped and extreme values (negative sizes, strings for numbers, huge counts, missing keys,
duplicate ids, boxes outside the image): every case loads, or raises BadInputError naming the
file; no other exception escapes. Loaded records satisfy what the pipeline relies on."""
import json
import os

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kerasdet.data import BadInputError, load_coco, load_voc  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("property")
    os.makedirs(folder / "img")
    os.makedirs(folder / "VOC" / "JPEGImages")
    os.makedirs(folder / "VOC" / "Annotations")
    os.makedirs(folder / "VOC" / "ImageSets" / "Main")
    pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    for path in (folder / "img" / "a.png", folder / "VOC" / "JPEGImages" / "a.png"):
        Image.fromarray(pixels).save(path)
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


# Values of the wrong type or at the extremes, for any field.
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["12", "1e999", "nan", "-3", "", "a.png", "../x.png", "/etc/passwd"]),
    st.lists(st.integers(-3, 40), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
SIZE = st.one_of(st.sampled_from([32, 24, 0, -24, 10 ** 12, 24.0, 24.5]), ANY)
BBOX = st.one_of(
    st.lists(st.one_of(st.integers(-50, 80), st.floats(-50, 80), st.none()), min_size=4, max_size=4),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4), ANY)


@st.composite
def coco_documents(draw):
    images = []
    for _ in range(draw(st.integers(0, 4))):
        image = {"id": draw(st.one_of(st.integers(0, 3), ANY)),
                 "file_name": draw(st.one_of(st.sampled_from(["a.png", "missing.png", "broken.png"]), ANY)),
                 "width": draw(st.one_of(st.just(32), SIZE)), "height": draw(st.one_of(st.just(24), SIZE))}
        for key in draw(st.lists(st.sampled_from(list(image)), max_size=2)):
            image.pop(key, None)  # missing keys
        images.append(image)
    annotations = []
    for _ in range(draw(st.integers(0, 6))):
        ann = {"id": draw(st.one_of(st.integers(0, 3), ANY)),
               "image_id": draw(st.one_of(st.integers(0, 3), ANY)),
               "category_id": draw(st.one_of(st.sampled_from([1, 2, 9]), ANY)),
               "bbox": draw(BBOX), "iscrowd": draw(st.one_of(st.sampled_from([0, 1]), ANY)),
               "segmentation": draw(st.one_of(st.just([[1, 1, 5, 1, 5, 5]]), ANY))}
        for key in draw(st.lists(st.sampled_from(list(ann)), max_size=2)):
            ann.pop(key, None)
        annotations.append(ann)
    categories = draw(st.one_of(
        st.just([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]),
        st.lists(st.fixed_dictionaries({"id": st.one_of(st.integers(0, 3), ANY), "name": ANY}), max_size=3),
        ANY))
    document = {"images": images, "annotations": annotations, "categories": categories}
    for key in draw(st.lists(st.sampled_from(list(document)), max_size=1)):
        document[key] = draw(ANY)  # a top-level list replaced by anything, or dropped
        if draw(st.booleans()):
            document.pop(key)
    return document


def _check_dataset(dataset):
    dataset.validate()  # finite, ordered boxes inside the image, labels in range
    for record in dataset.records:
        assert record.width > 0 and record.height > 0


@SETTINGS
@given(document=coco_documents(), check=st.sampled_from(["header", "none"]),
       on_bad=st.sampled_from(["error", "skip"]), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_coco_reader_loads_or_names_the_file(root, document, check, on_bad, cut):
    path = str(root / "instances.json")
    text = json.dumps(document)
    if cut is not None:
        text = text[:cut]  # truncated file
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    try:
        dataset = load_coco(path, str(root / "img"), check_images=check, on_bad=on_bad)
    except BadInputError as error:
        assert path in str(error)
        return
    _check_dataset(dataset)


XML_VALUE = st.one_of(st.sampled_from(["1", "3", "20", "33", "0", "-4", "1e999", "nan", "abc", "",
                                       "  12 ", "99999999999999999999"]), st.text(max_size=5))


@st.composite
def voc_documents(draw):
    def tag(name, value):
        return "" if value is None else f"<{name}>{value}</{name}>"

    parts = ["<annotation>", tag("filename", draw(st.one_of(
        st.none(), st.sampled_from(["a.png", "missing.png", "../a.png", "/etc/passwd", ""]))))]
    if draw(st.booleans()):
        parts.append("<size>" + tag("width", draw(st.one_of(st.none(), st.just("32"), XML_VALUE)))
                     + tag("height", draw(st.one_of(st.none(), st.just("24"), XML_VALUE))) + "</size>")
    for _ in range(draw(st.integers(0, 5))):
        box = "".join(tag(t, draw(st.one_of(st.none(), XML_VALUE))) for t in ("xmin", "ymin", "xmax", "ymax"))
        parts.append("<object>" + tag("name", draw(st.sampled_from(["dog", "cat", "", " dog "])))
                     + tag("difficult", draw(st.one_of(st.none(), XML_VALUE)))
                     + (f"<bndbox>{box}</bndbox>" if draw(st.booleans()) or True else "") + "</object>")
    parts.append("</annotation>")
    return "".join(parts)


@SETTINGS
@given(xml=voc_documents(), check=st.sampled_from(["header", "none"]),
       on_bad=st.sampled_from(["error", "skip"]), cut=st.one_of(st.none(), st.integers(0, 300)))
def test_voc_reader_loads_or_names_the_file(root, xml, check, on_bad, cut):
    voc = root / "VOC"
    path = str(voc / "Annotations" / "a.xml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(xml if cut is None else xml[:cut])
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    try:
        dataset = load_voc(str(voc), "train", class_names=["dog", "cat"], check_images=check,
                           on_bad=on_bad)
    except BadInputError as error:
        assert "a.xml" in str(error)
        return
    _check_dataset(dataset)


def test_huge_counts_load(root):
    """10000 annotations on one image and 2000 images of one file: loaded, not refused."""
    images = [{"id": i, "file_name": "a.png", "width": 32, "height": 24} for i in range(2000)]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 20, (10000, 2))
    annotations = [{"id": i, "image_id": 0, "category_id": 1, "bbox": [x, y, 5, 3]}
                   for i, (x, y) in enumerate(xy.tolist())]
    path = root / "huge.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}]}))
    dataset = load_coco(str(path), str(root / "img"), check_images="none")
    assert len(dataset) == 2000 and dataset.records[0].num_objects == 10000
