"""A deterministic synthetic detection data set: coloured shapes on textured backgrounds.

Each class is a shape with its own base colour (jittered per object, plus pixel noise), drawn on a
background of noise, a gradient or stripes. Objects never overlap, so every mask is the whole object
and every box is exactly its mask's bounding box. Sizes and counts vary (including images without
objects). The default task (128x128, 3 classes, objects 16..64 px, 0..4 per image) is small enough
for a detector to learn on two CPU cores in a minute or two.

Same arguments -> byte-identical files: every image draws from its own generator seeded with
(seed, image index), PNG/JSON/XML writing has no timestamps, JSON keys are sorted.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from kerasdet.data.masks import mask_bounding_box, mask_to_rle

SHAPES = ("circle", "square", "triangle", "cross", "ring")
# Well separated hues so colour helps, jitter + noise so it does not decide alone.
BASE_COLORS = {
    "circle": (215, 60, 50), "square": (60, 185, 70), "triangle": (60, 90, 215),
    "cross": (225, 195, 40), "ring": (195, 60, 195),
}


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean [size, size] mask of a shape filling its square, sampled at pixel centres."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    x, y = np.meshgrid(c, c)
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return (y >= 2 * np.abs(x - 0.5))
    if shape == "cross":
        arm = rng.uniform(0.28, 0.4) / 2
        return (np.abs(x - 0.5) <= arm) | (np.abs(y - 0.5) <= arm)
    if shape == "ring":
        r2 = (x - 0.5) ** 2 + (y - 0.5) ** 2
        inner = rng.uniform(0.2, 0.3)
        return (r2 <= 0.25) & (r2 >= inner ** 2)
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [H, W, 3] textured background (noise, gradient or stripes) in muted colours."""
    def muted():
        gray = rng.uniform(60, 190)
        return gray + rng.uniform(-35, 35, size=3)

    kind = rng.integers(3)
    if kind == 0:  # coarse noise blobs
        coarse = rng.normal(0, 25, size=(max(2, height // 8), max(2, width // 8), 3))
        big = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width]
        big = np.pad(big, ((0, height - big.shape[0]), (0, width - big.shape[1]), (0, 0)), mode="edge")
        return (muted() + big).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    t = (xx * np.cos(angle) + yy * np.sin(angle))
    if kind == 1:  # linear gradient between two colours
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    else:  # stripes
        period = rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * t / period)
    a, b = muted(), muted()
    return (a + (b - a) * t[..., None]).astype(np.float32)


def _draw_image(index: int, seed: int, image_size, classes, object_size, max_objects, noise, min_objects=0):
    rng = np.random.default_rng([seed, index])
    height, width = _pick_size(image_size, rng)
    image = _background(height, width, rng)
    lo, hi = object_size
    hi = min(hi, height, width)
    lo = min(lo, hi)
    objects = []
    taken = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        label = int(rng.integers(len(classes)))
        for _attempt in range(20):  # rejection sampling for a free spot
            size = int(rng.integers(lo, hi + 1))
            y0 = int(rng.integers(0, height - size + 1))
            x0 = int(rng.integers(0, width - size + 1))
            if not taken[y0:y0 + size, x0:x0 + size].any():
                break
        else:
            continue
        local = _shape_mask(classes[label], size, rng)
        mask = np.zeros((height, width), bool)
        mask[y0:y0 + size, x0:x0 + size] = local
        if not mask.any():
            continue
        taken[y0:y0 + size, x0:x0 + size] = True
        color = np.clip(np.array(BASE_COLORS[classes[label]]) + rng.uniform(-30, 30, 3), 0, 255)
        image[mask] = color
        objects.append((label, mask))
    image += rng.normal(0, noise, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, objects


def _pick_size(image_size, rng):
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    h = int(rng.integers(h[0], h[1] + 1)) if isinstance(h, (tuple, list)) else int(h)
    w = int(rng.integers(w[0], w[1] + 1)) if isinstance(w, (tuple, list)) else int(w)
    return h, w


def make_dataset(root: str, num_images: int = 200, seed: int = 0, image_size=(128, 128),
                 format: str = "coco", *, num_classes: int = 3, object_size=(16, 64),
                 max_objects: int = 4, noise: float = 8.0, split: str = "train",
                 write_instance_pngs: bool = True, min_objects: int = 0):
    """Write a synthetic detection data set and return it loaded as a DetectionDataset.

    Args:
        root: output directory (created).
        num_images: how many images.
        seed: same seed and arguments -> byte-identical files.
        image_size: (H, W) or an int for square images, or ((h_min, h_max), (w_min, w_max)) to draw
            each image's size.
        format: "coco" writes images/<id>.png and annotations/instances_<split>.json with RLE masks;
            "voc" writes JPEGImages/<id>.png (named by <filename>), Annotations/<id>.xml (1-based
            coordinates), ImageSets/Main/<split>.txt and, if ``write_instance_pngs``,
            SegmentationObject/<id>.png (0 = background, i = i-th object).
        num_classes: 1..5 shape classes, in the order of ``SHAPES``.
        object_size: (min, max) side of an object's square in pixels (clamped to the image).
        max_objects: objects per image are drawn uniformly from min_objects..max_objects (overlaps
            are rejected, so crowded images may hold fewer).
        noise: standard deviation of the Gaussian pixel noise.
        split: split name used in the file names.
        min_objects: the fewest objects an image is drawn with (1 with max_objects=1: the
            single-object localization set).

    Returns:
        kerasdet.data.DetectionDataset read back through the COCO or VOC reader.
    """
    if format not in ("coco", "voc"):
        raise ValueError(f"format must be 'coco' or 'voc', got {format!r}")
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if (num_images < 0 or not 0 <= min_objects <= max_objects or object_size[0] < 1
            or object_size[0] > object_size[1]):
        raise ValueError("need num_images >= 0, 0 <= min_objects <= max_objects and 1 <= object_size[0] <= "
                         f"object_size[1]; got {num_images}, {min_objects}..{max_objects}, {object_size}")
    classes = SHAPES[:num_classes]
    image_dir = os.path.join(root, "images" if format == "coco" else "JPEGImages")
    os.makedirs(image_dir, exist_ok=True)
    samples = []
    for index in range(num_images):
        image, objects = _draw_image(index, seed, image_size, classes, object_size, max_objects, noise,
                                     min_objects)
        name = f"{index:06d}"
        Image.fromarray(image).save(os.path.join(image_dir, name + ".png"), format="PNG")
        samples.append((name, image.shape[0], image.shape[1], objects))
    if format == "coco":
        return _write_coco(root, split, classes, samples)
    return _write_voc(root, split, classes, samples, write_instance_pngs)


def _write_coco(root, split, classes, samples):
    from kerasdet.data.coco import load_coco

    images, annotations = [], []
    for index, (name, height, width, objects) in enumerate(samples):
        images.append({"id": index + 1, "file_name": name + ".png", "height": height, "width": width})
        for label, mask in objects:
            x1, y1, x2, y2 = mask_bounding_box(mask).tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0,
                "segmentation": mask_to_rle(mask),
            })
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                           for i, n in enumerate(classes)]}
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    path = os.path.join(ann_dir, f"instances_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True, separators=(",", ":"))
    return load_coco(path, os.path.join(root, "images"))


def _write_voc(root, split, classes, samples, write_instance_pngs):
    from kerasdet.data.voc import load_voc, write_voc_annotation

    for sub in ("Annotations", os.path.join("ImageSets", "Main"), "SegmentationObject"):
        if sub != "SegmentationObject" or write_instance_pngs:
            os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name, height, width, objects in samples:
        instance_png = np.zeros((height, width), np.uint8)
        items = []
        for i, (label, mask) in enumerate(objects):
            items.append({"name": classes[label], "box": mask_bounding_box(mask)})
            instance_png[mask] = i + 1
        write_voc_annotation(os.path.join(root, "Annotations", name + ".xml"), name + ".png", height,
                             width, items, folder="synthetic")
        if write_instance_pngs:
            Image.fromarray(instance_png).save(os.path.join(root, "SegmentationObject", name + ".png"))
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w", encoding="utf-8") as f:
        f.write("".join(name + "\n" for name, *_ in samples))
    return load_voc(root, split, class_names=classes, load_masks=write_instance_pngs)
