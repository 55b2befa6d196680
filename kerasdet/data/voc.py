"""Pascal VOC reader (standard tree: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt).

Coordinates: VOC's <bndbox> holds 1-based inclusive pixel indices (xmin=1 is the first column,
xmax is the last column covered). In kerasdet's continuous 0-based coordinates the box covering
columns xmin..xmax is [xmin - 1, xmax): so x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax, and
the box's width is xmax - xmin + 1 pixels, as VOC intends. Writers do the inverse.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from kerasdet.data.images import check_image, check_image_pixels
from kerasdet.data.records import (BadInputError, BadInputReport, DetectionDataset, DetectionRecord,
                                   FatalInputError, check_on_bad, resolve_image_path,
                                   sanitize_boxes)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def read_split(root: str, split: str) -> list[str]:
    """Image ids listed in ImageSets/Main/<split>.txt (first token of each non-empty line)."""
    path = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VOC split file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def discover_class_names(root: str, splits) -> list[str]:
    """The class names a VOC-format data set uses, for ``load_voc(class_names=...)``.

    Pascal VOC's 20 names in VOC's order when every ``<name>`` of the splits' annotations is one of
    them (a VOC subset keeps VOC's label ids), otherwise the sorted union of the names over all the
    given splits, so that a training and a validation split read with it share one label order.
    Annotations that are missing or malformed are passed over here; ``load_voc`` reports them.
    """
    names = set()
    for split in ([splits] if isinstance(splits, str) else splits):
        for image_id in read_split(root, split):
            xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
            try:
                tree = ET.parse(xml_path).getroot()
            except (OSError, ET.ParseError):
                continue
            names.update((obj.findtext("name") or "").strip() for obj in tree.findall("object"))
    names.discard("")
    if names <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return sorted(names)


def _number(node, tag, where):
    child = node.find(tag)
    if child is None or child.text is None:
        raise BadInputError(f"{where}: missing <{tag}>")
    try:
        return float(child.text.strip())
    except ValueError as exc:
        raise BadInputError(f"{where}: <{tag}> is not a number: {child.text!r}") from exc


def _size(node, tag, where):
    value = _number(node, tag, f"{where} <size>")
    if not np.isfinite(value) or abs(value) > 2 ** 31 - 1:
        raise BadInputError(f"{where}: <size><{tag}> {value!r} is not a usable image size")
    return int(value)


def load_voc(root: str, split: str = "trainval", *, class_names=None, on_bad: str = "error",
             check_images: str = "header", keep_difficult: bool = True,
             skip_empty: bool = False, load_masks: bool = False,
             max_image_pixels: int | None = None) -> DetectionDataset:
    """Read a Pascal VOC style data set.

    Args:
        root: the VOC year directory (holding Annotations/, JPEGImages/, ImageSets/Main/).
        split: name of the ImageSets/Main split file ("train", "val", "trainval", "test", ...).
        class_names: names in label order. None (default): ``discover_class_names(root, split)``,
            i.e. VOC's 20 classes for Pascal VOC, the sorted names found for any other set. Give
            them explicitly when several splits must share one order.
        on_bad: "error" raises BadInputError naming the XML file and image for a missing, unreadable
            or malformed annotation or image, or an object of a class not in ``class_names``;
            "skip" drops that image (or object) and counts it in ``dataset.report`` (one warning).
            Whatever the policy, NaN boxes raise; degenerate boxes are dropped and boxes outside the
            image clipped/dropped with a counted warning; file names escaping JPEGImages/ raise.
        check_images: "header", "decode" or "none" (see ``load_coco``).
        keep_difficult: keep "difficult" objects (flagged in ``record.difficult``; the VOC
            evaluation ignores them). False drops them.
        skip_empty: drop images without objects (kept by default: they are negatives).
        load_masks: read instance masks from SegmentationObject/<id>.png where it exists (VOC's
            convention: pixel value i + 1 is the i-th <object> of the XML, 0 background, 255 the
            void border, taken as background); stored as COCO RLE in ``record.masks``. Images
            without such a file get ``masks=None``.
        max_image_pixels: refuse images whose declared size (XML or header) is larger, before
            decoding (see ``load_coco``).

    With on_bad="error" the reader goes through the whole split and raises one BadInputError that
    lists every bad record (XML file, image, reason).
    """
    check_on_bad(on_bad)
    class_names = discover_class_names(root, split) if class_names is None else list(class_names)
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"VOC {root} split {split}: class_names must be distinct names, got {class_names}")
    label_of = {name: i for i, name in enumerate(class_names)}
    image_root = os.path.join(root, "JPEGImages")
    report = BadInputReport(f"VOC {root} split {split}")
    records = []
    for image_id in read_split(root, split):
        xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
        where = f"{xml_path} (image {image_id})"
        try:
            record = _parse(xml_path, image_id, image_root, label_of, where, on_bad, report,
                            check_images, keep_difficult, max_image_pixels)
            if load_masks:
                record = _attach_masks(record, os.path.join(root, "SegmentationObject",
                                                            f"{image_id}.png"), where)
            else:
                record.masks = None
        except FatalInputError:
            raise
        except BadInputError as exc:
            if on_bad == "error":
                report.collect(exc)  # go on: the error lists every bad record, not the first
            else:
                report.add("missing or unreadable image or annotation skipped", where)
            continue
        if skip_empty and record.num_objects == 0:
            continue
        records.append(record)
    report.raise_collected()
    report.warn()
    return DetectionDataset(records, class_names, image_root, None, report)


def _parse(xml_path, image_id, image_root, label_of, where, on_bad, report, check_images,
           keep_difficult, max_image_pixels=None):
    if not os.path.isfile(xml_path):
        raise BadInputError(f"{where}: annotation file not found")
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise BadInputError(f"{where}: malformed XML: {exc}") from exc
    file_name = tree.findtext("filename")
    file_name = file_name.strip() if file_name and file_name.strip() else f"{image_id}.jpg"
    rel = resolve_image_path(image_root, file_name, where)
    path = os.path.join(image_root, *rel.split("/"))
    size = tree.find("size")
    expected = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        expected = (_size(size, "height", where), _size(size, "width", where))
        if expected[0] <= 0 or expected[1] <= 0:
            expected = None  # some VOC-style tools write 0: trust the image instead
    if expected is not None:
        check_image_pixels(*expected, where, max_image_pixels)
    if check_images != "none":
        height, width = check_image(path, expected, check_images, where,
                                    max_image_pixels=max_image_pixels)
    elif expected is None:
        raise BadInputError(f"{where}: no <size> and check_images='none'")
    else:
        height, width = expected

    boxes, labels, difficult, object_ids = [], [], [], []
    for i, obj in enumerate(tree.findall("object")):
        obj_where = f"{where} object {i}"
        name = (obj.findtext("name") or "").strip()
        if name not in label_of:
            if on_bad == "error":
                raise BadInputError(f"{obj_where}: unknown class name {name!r}; the class names are "
                                    f"{list(label_of)}")
            report.add("unknown class skipped", obj_where)
            continue
        is_difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        if is_difficult and not keep_difficult:
            continue
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise BadInputError(f"{obj_where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bndbox, t, obj_where) for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])  # 1-based inclusive -> continuous
        labels.append(label_of[name])
        difficult.append(is_difficult)
        object_ids.append(i)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    clipped, keep = sanitize_boxes(boxes, width, height, where, report, object_ids)
    # masks temporarily hold each object's XML index, for _attach_masks
    record = DetectionRecord(image_id=image_id, image_path=rel, width=width, height=height,
                             boxes=clipped, labels=labels, difficult=difficult, masks=object_ids)
    return record.select(keep)


def _attach_masks(record, png_path, where):
    """Replace the XML indices in record.masks by RLE masks from a SegmentationObject PNG."""
    from kerasdet.data.masks import mask_to_rle

    xml_indices = record.masks or []
    if not os.path.isfile(png_path):
        record.masks = None
        return record
    try:
        with Image.open(png_path) as img:
            instances = np.asarray(img)  # palette indices (P) or gray values (L)
    except OSError as exc:
        raise BadInputError(f"{where}: cannot read instance mask {png_path}: {exc}") from exc
    if instances.shape[:2] != (record.height, record.width) or instances.ndim != 2:
        raise BadInputError(f"{where}: instance mask {png_path} has shape {instances.shape}, "
                            f"image is {record.height}x{record.width}")
    record.masks = [mask_to_rle(instances == i + 1) for i in xml_indices]
    return record


def write_voc_annotation(path, filename, height, width, objects, folder="kerasdet"):
    """Write one Pascal VOC annotation XML (the format `load_voc` reads).

    ``objects``: dicts with ``name``, ``box`` (x1, y1, x2, y2) in kerasdet's continuous pixel
    coordinates, and optional ``difficult`` / ``truncated`` flags. The box is written as VOC's
    1-based inclusive pixel indices (x1 + 1, y1 + 1, x2, y2).
    """
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    size = ET.SubElement(ann, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(int(value))
    for item in objects:
        x1, y1, x2, y2 = (int(round(float(v))) for v in item["box"])
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = str(item["name"])
        if "truncated" in item:
            ET.SubElement(obj, "truncated").text = str(int(bool(item["truncated"])))
        ET.SubElement(obj, "difficult").text = str(int(bool(item.get("difficult", False))))
        box = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(ann)
    ET.ElementTree(ann).write(path, encoding="utf-8")
