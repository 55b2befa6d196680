"""Real photographs with boxes, made offline from scikit-image's bundled sample images.

Sources (both ship inside the scikit-image package, so no download is needed):

- ``"coins"``: ``skimage.data.coins()`` (303x384 gray, 24 Greek coins), class ``"coin"``. Coins are
  segmented as scikit-image's gallery does ("Comparing edge-based and region-based segmentation"):
  watershed of the Sobel elevation map from markers of dark background (< 30) and bright coin
  (> 150) pixels, holes filled, connected regions of at least ``COIN_MIN_AREA`` pixels.
- ``"hubble"``: ``skimage.data.hubble_deep_field()`` (872x1000 RGB), class ``"galaxy"`` (a few
  are stars): gray image smoothed (Gaussian, sigma 1), Li's threshold (Otsu's leaves half the
  visible galaxies out), connected regions. Regions of at least ``GALAXY_MIN_AREA`` pixels are
  objects; from ``GALAXY_MIN_AREA_DIFFICULT`` up they are kept as difficult (faint specks a person
  would not box either way); smaller ones are dropped. Touching galaxies make one box. The image
  is upscaled 2x (bilinear; labels nearest) so the galaxies are about 8..170 px across, sizes a
  small detector's anchors reach.

Each object's box is its region's bounding box: a deterministic, classical labelling, not a human
one, but of real photographs with real texture, lighting and clutter.

Train / held-out split, by position: each image is cut at a column near ``1 - held_out_fraction`` of
its width (the column with the fewest object pixels within 10% of the width on either side, so few
objects are cut); the left part gives the train tiles, the right part the held-out ("test") tiles.
Tiles never cross the cut, so no pixel of a held-out tile is in a train tile.

Tiles: ``tile_size`` squares every ``stride`` pixels, the last row / column aligned with the part's
edge so every pixel is covered. An object's share of a tile is the fraction of its pixels (in the
whole image) that lie in the tile:

- share >= 0.5: an object, boxed by the bounding box of its pixels inside the tile;
- 0.1 <= share < 0.5: the same, flagged ``<difficult>1</difficult>`` (VOC evaluation neither
  rewards nor penalizes a detection of it: a half-visible coin is a fair guess either way);
- share < 0.1: dropped (a sliver at the edge).

Output: a Pascal VOC tree (JPEGImages/<id>.png, named by <filename>; Annotations/<id>.xml with
1-based inclusive <bndbox>; ImageSets/Main/{train,test}.txt; SegmentationObject/<id>.png with value
i + 1 on the pixels of the i-th <object>). Same arguments -> byte-identical files. Tile ids are
``<source>_<x>_<y>`` (the tile's top-left pixel in the possibly upscaled image).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from kerasdet.data.masks import mask_bounding_box
from kerasdet.data.voc import write_voc_annotation

COIN_MIN_AREA = 100
GALAXY_MIN_AREA = 40  # pixels of the original image
GALAXY_MIN_AREA_DIFFICULT = 10
MIN_SHARE = 0.5  # below: difficult
MIN_SHARE_DIFFICULT = 0.1  # below: dropped
SPLITS = ("train", "test")


def _skimage():
    try:
        import skimage  # noqa: F401
        import skimage.color
        import skimage.data
        import skimage.filters
        import skimage.measure
        import skimage.segmentation
    except ImportError as exc:
        raise ImportError("kerasdet.data.sample_photos needs scikit-image: pip install scikit-image "
                          "(it is in kerasdet's 'test' extra)") from exc
    return skimage


@dataclass(frozen=True)
class _Photo:
    """One source image: uint8 RGB [H, W, 3], int32 labels [H, W] (0 background, k = object k) and
    bool small [n + 1] (small[k]: object k is difficult whatever its share of a tile)."""
    name: str
    class_name: str
    image: np.ndarray
    labels: np.ndarray
    small: np.ndarray


def _coins():
    ski = _skimage()
    from scipy import ndimage

    gray = ski.data.coins()
    markers = np.zeros(gray.shape, np.int32)
    markers[gray < 30] = 1
    markers[gray > 150] = 2
    coins = ski.segmentation.watershed(ski.filters.sobel(gray), markers) == 2
    labels = ski.measure.label(ndimage.binary_fill_holes(coins))
    labels = _drop_small(labels, COIN_MIN_AREA)
    small = np.zeros(labels.max() + 1, bool)
    return _Photo("coins", "coin", np.repeat(gray[..., None], 3, axis=-1), labels, small)


def _hubble(scale=2):
    ski = _skimage()

    image = ski.data.hubble_deep_field()
    gray = ski.filters.gaussian(ski.color.rgb2gray(image), sigma=1.0)
    labels = ski.measure.label(gray > ski.filters.threshold_li(gray))
    labels = _drop_small(labels, GALAXY_MIN_AREA_DIFFICULT)
    small = np.bincount(labels.ravel()) < GALAXY_MIN_AREA
    # Bilinear for the pixels; each label pixel becomes a scale x scale block (nearest).
    big = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale),
                                        Image.Resampling.BILINEAR)
    labels = np.repeat(np.repeat(labels, scale, axis=0), scale, axis=1)
    return _Photo("hubble", "galaxy", np.asarray(big), labels, small)


def _drop_small(labels, min_area):
    """Relabel 1..n keeping regions of at least ``min_area`` pixels, in raster order of first pixel."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    new_ids = np.zeros(areas.shape, np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


# name -> (loader, default stride as a fraction of tile_size). Coins are large (about 40 px in a
# 128 px tile) and few, so tiles overlap by half and a coin cut by one tile is whole in the next;
# galaxies are small and many, so tiles do not overlap (half overlap would give 810 tiles, 15 s).
SOURCES = {"coins": (_coins, 0.5), "hubble": (_hubble, 1.0)}


def split_column(labels, held_out_fraction, window=0.1):
    """The column where the held-out part starts: the one with the fewest object pixels within
    ``window`` x width of ``(1 - held_out_fraction)`` x width (nearest the target on ties)."""
    width = labels.shape[1]
    target = int(round(width * (1.0 - held_out_fraction)))
    radius = int(round(width * window))
    candidates = np.arange(max(1, target - radius), min(width - 1, target + radius) + 1)
    filled = np.count_nonzero(labels[:, candidates] > 0, axis=0)
    order = np.lexsort((np.abs(candidates - target), filled))
    return int(candidates[order[0]])


def tile_starts(length, tile_size, stride):
    """Start offsets covering [0, length) with tiles of ``tile_size`` every ``stride``, the last one
    aligned with the end."""
    if length < tile_size:
        raise ValueError(f"a part of {length} px is narrower than tile_size={tile_size}; use a smaller "
                         "tile_size or held_out_fraction nearer 0.5")
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] != length - tile_size:
        starts.append(length - tile_size)
    return starts


def tile_objects(labels, areas, small, window):
    """Objects of one tile: list of (box [4] in tile pixels, difficult, truncated, tile mask).

    ``areas[k]`` is object k's pixel count in the whole image, ``small[k]`` makes it difficult;
    ``window`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = window
    crop = labels[y0:y1, x0:x1]
    visible = np.bincount(crop.ravel(), minlength=areas.size)
    objects = []
    for k in np.flatnonzero(visible[1:]) + 1:
        share = visible[k] / areas[k]
        if share < MIN_SHARE_DIFFICULT:
            continue
        mask = crop == k
        objects.append((mask_bounding_box(mask), bool(share < MIN_SHARE or small[k]), bool(share < 1.0),
                        mask))
    return objects


def _write_tile(root, tile_id, image, objects, class_name):
    height, width = image.shape[:2]
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", tile_id + ".png"), format="PNG",
                                     compress_level=1)  # 10x faster than the default level 6
    instances = np.zeros((height, width), np.uint8)
    items = []
    for i, (box, difficult, truncated, mask) in enumerate(objects):
        items.append({"name": class_name, "box": box, "difficult": difficult, "truncated": truncated})
        instances[mask] = i + 1
    write_voc_annotation(os.path.join(root, "Annotations", tile_id + ".xml"), tile_id + ".png", height,
                         width, items, folder="sample_photos")
    Image.fromarray(instances).save(os.path.join(root, "SegmentationObject", tile_id + ".png"),
                                    compress_level=1)


def write_sample_photos(root, sources=("coins",), tile_size=128, stride=None, held_out_fraction=1 / 3):
    """Write the VOC tree described in the module docstring to ``root``; return its class names.

    Args:
        root: output folder (created; files of the same names are overwritten).
        sources: names from ``SOURCES`` ("coins", "hubble"); one class each, in this order.
        tile_size: side of the square tiles in pixels.
        stride: distance between tile starts; default per source (``SOURCES``): ``tile_size // 2``
            for coins, ``tile_size`` for the galaxies.
        held_out_fraction: the share of each image's width (approximately) kept for "test".

    Returns:
        the class names (tuple), for ``load_voc(root, split, class_names=...)``.
    """
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if not sources or unknown or len(set(sources)) != len(sources):
        raise ValueError(f"sources must be distinct names from {sorted(SOURCES)}, got {sources!r}")
    if tile_size < 16 or not (stride is None or 0 < stride <= tile_size):
        raise ValueError(f"need tile_size >= 16 and 0 < stride <= tile_size, got {tile_size}, {stride}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main"), "SegmentationObject"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids = {split: [] for split in SPLITS}
    class_names = []
    for source in sources:
        load, stride_fraction = SOURCES[source]
        photo = load()
        step = int(stride) if stride is not None else max(1, int(round(tile_size * stride_fraction)))
        class_names.append(photo.class_name)
        areas = np.bincount(photo.labels.ravel())
        height, width = photo.labels.shape
        cut = split_column(photo.labels, held_out_fraction)
        for split, (left, right) in zip(SPLITS, ((0, cut), (cut, width))):
            for y in tile_starts(height, tile_size, step):
                for x in (left + s for s in tile_starts(right - left, tile_size, step)):
                    window = (x, y, x + tile_size, y + tile_size)
                    tile_id = f"{source}_{x:04d}_{y:04d}"
                    _write_tile(root, tile_id, photo.image[y:y + tile_size, x:x + tile_size],
                                tile_objects(photo.labels, areas, photo.small, window), photo.class_name)
                    ids[split].append(tile_id)
    for split in SPLITS:
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(i + "\n" for i in ids[split]))
    return tuple(class_names)


def make_sample_photos(root, sources=("coins",), **kwargs):
    """Write the tree (``write_sample_photos``) and read it back: (train, test) DetectionDatasets."""
    from kerasdet.data.voc import load_voc

    class_names = write_sample_photos(root, sources, **kwargs)
    return tuple(load_voc(root, split, class_names=class_names) for split in SPLITS)


def save_preview(dataset, path, count=6, columns=3, gap=4):
    """Draw the boxes of the first ``count`` images of ``dataset`` (difficult ones white) in a grid
    and save it as PNG; returns the path. For looking at the labels, not for measurement."""
    from kerasdet.data.images import read_image
    from kerasdet.visualize import draw_detections, save_png

    records = dataset.records[:count]
    if not records:
        raise ValueError("the data set has no images to preview")
    panels = []
    for record in records:
        hard = record.difficult
        panel = draw_detections(read_image(dataset.image_file(record)), record.boxes[~hard],
                                record.labels[~hard], class_names=list(dataset.class_names),
                                line_width=1)
        panels.append(draw_detections(panel, record.boxes[hard], line_width=1))  # white, no caption
    height = max(p.shape[0] for p in panels)
    width = max(p.shape[1] for p in panels)
    rows = -(-len(panels) // columns)
    grid = np.full((rows * (height + gap), columns * (width + gap), 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        grid[r * (height + gap):r * (height + gap) + panel.shape[0],
             c * (width + gap):c * (width + gap) + panel.shape[1]] = panel
    return save_png(grid, path)
