"""Box-aware augmentation on single samples, in pure TensorFlow (runs inside tf.data.Dataset.map).

A *sample* is a dict: ``image`` float32 [h, w, 3] (RGB, 0..255), ``boxes`` float32 [n, 4] (x1, y1, x2, y2)
in pixels, ``labels`` int32 [n], ``difficult`` / ``iscrowd`` bool [n], optional ``masks`` [n, M, M]: each
object's mask as a grid covering its box (kerasdet.data.mask_grids), so geometric steps move a grid
with its box: a flip mirrors it, expand and resize leave it as it is (its box moves and scales), and
a crop or clip that cuts a box re-crops the grid to the part kept. Other keys pass through. Every
function takes an explicit stateless ``seed`` (int32/int64 [2]) so that a seeded pipeline repeats
exactly, whatever the parallelism.

Why not Keras 3's RandomFlip / RandomCrop / RandomZoom (they do support bounding boxes): measured in
tf.data with ``seed=1`` and ``num_parallel_calls=2``, RandomFlip gave a different flip sequence in each
run and each process, so a seeded pipeline would not repeat; they also cannot move instance masks
with the boxes, and RandomCrop has no minimum-IoU sampling (SSD's crop needs it).
The photometric steps do use TensorFlow's stateless ``tf.image.stateless_random_*`` ops, and the IoU of
the crop sampler is ``keras.utils.bounding_boxes.compute_iou``.

The SSD recipe (Liu et al., used by RefineDet, seed 002): photometric distortion, expand (zoom out onto
a mean-filled canvas up to 4x), a random crop whose IoU with some object is at least one of
{0.1, 0.3, 0.5, 0.7, 0.9} (or unconstrained, or no crop), then horizontal flip.
"""
from __future__ import annotations

import tensorflow as tf
from keras.utils import bounding_boxes as keras_boxes

from kerasdet.data.mask_grids import recrop_grids

OBJECT_KEYS = ("boxes", "labels", "difficult", "iscrowd", "masks")
# ImageNet RGB mean, the fill SSD uses for the expand canvas.
MEAN_RGB = (123.675, 116.28, 103.53)


def _sub_seed(seed, k: int):
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), k)


def _image_hw(sample):
    shape = tf.shape(sample["image"])
    return tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)


def filter_objects(sample: dict, keep) -> dict:
    """Keep only the objects where ``keep`` [n] is True (boxes, labels, flags and masks together)."""
    out = dict(sample)
    for key in OBJECT_KEYS:
        if key in sample:
            out[key] = tf.boolean_mask(sample[key], keep)
    return out


def clip_and_drop_empty(sample: dict, min_size: float = 0.0) -> dict:
    """Clip boxes to the image (mask grids re-cropped with them); drop those whose clipped width or
    height is <= ``min_size``."""
    h, w = _image_hw(sample)
    x1, y1, x2, y2 = tf.unstack(sample["boxes"], num=4, axis=-1)
    boxes = tf.stack([tf.clip_by_value(x1, 0.0, w), tf.clip_by_value(y1, 0.0, h),
                      tf.clip_by_value(x2, 0.0, w), tf.clip_by_value(y2, 0.0, h)], axis=-1)
    out = dict(sample, boxes=boxes)
    if "masks" in sample:
        out["masks"] = recrop_grids(sample["masks"], sample["boxes"], boxes)
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    return filter_objects(out, keep)


def horizontal_flip(sample: dict) -> dict:
    """Mirror image, boxes (x -> w - x) and mask grids left-right."""
    _, w = _image_hw(sample)
    x1, y1, x2, y2 = tf.unstack(sample["boxes"], num=4, axis=-1)
    out = dict(sample, image=tf.reverse(sample["image"], axis=[1]),
               boxes=tf.stack([w - x2, y1, w - x1, y2], axis=-1))
    if "masks" in sample:
        out["masks"] = tf.reverse(sample["masks"], axis=[2])
    return out


def random_flip(sample: dict, seed, probability: float = 0.5) -> dict:
    """Horizontal flip with the given probability."""
    flip = tf.random.stateless_uniform([], seed) < probability
    return tf.cond(flip, lambda: horizontal_flip(sample), lambda: dict(sample))


def photometric_distort(sample: dict, seed, brightness_delta: float = 32.0,
                        contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                        hue_delta_degrees: float = 18.0, probability: float = 0.5) -> dict:
    """SSD's photometric distortion: each of brightness, contrast, saturation and hue is applied with
    ``probability``; contrast comes first or last at random (as in SSD). Boxes are untouched."""
    image = sample["image"] / 255.0

    def maybe(k, fn, img):
        on = tf.random.stateless_uniform([], _sub_seed(seed, 10 + k)) < probability
        return tf.cond(on, lambda: fn(img, _sub_seed(seed, 20 + k)), lambda: img)

    def brightness(img, s):
        return tf.image.stateless_random_brightness(img, brightness_delta / 255.0, s)

    def contrast(img, s):
        return tf.image.stateless_random_contrast(img, contrast_range[0], contrast_range[1], s)

    def saturation(img, s):
        return tf.image.stateless_random_saturation(img, saturation_range[0], saturation_range[1], s)

    def hue(img, s):
        # tf.image expresses hue shifts as a fraction of the colour circle.
        return tf.image.stateless_random_hue(img, hue_delta_degrees / 360.0, s)

    image = maybe(0, brightness, image)
    contrast_first = tf.random.stateless_uniform([], _sub_seed(seed, 1)) < 0.5
    image = tf.cond(contrast_first, lambda: maybe(1, contrast, image), lambda: image)
    image = tf.clip_by_value(image, 0.0, 1.0)
    image = maybe(2, saturation, image)
    image = maybe(3, hue, image)
    image = tf.cond(contrast_first, lambda: image,
                    lambda: maybe(1, contrast, tf.clip_by_value(image, 0.0, 1.0)))
    return dict(sample, image=tf.clip_by_value(image, 0.0, 1.0) * 255.0)


def random_expand(sample: dict, seed, max_ratio: float = 4.0, probability: float = 0.5,
                  fill_value=MEAN_RGB) -> dict:
    """SSD's zoom out: place the image at a random spot of a canvas ``ratio`` times larger
    (ratio ~ U[1, max_ratio]) filled with ``fill_value``; boxes shift with it (and their mask grids)."""
    h, w = _image_hw(sample)

    def expand():
        ratio = tf.random.stateless_uniform([], _sub_seed(seed, 1), 1.0, max_ratio)
        new_h, new_w = tf.floor(h * ratio), tf.floor(w * ratio)
        offset = tf.floor(tf.random.stateless_uniform([2], _sub_seed(seed, 2))
                          * tf.stack([new_h - h + 1.0, new_w - w + 1.0]))
        oy, ox = tf.cast(offset[0], tf.int32), tf.cast(offset[1], tf.int32)
        pad_h = tf.cast(new_h - h, tf.int32) - oy
        pad_w = tf.cast(new_w - w, tf.int32) - ox
        paddings = [[oy, pad_h], [ox, pad_w]]
        fill = tf.constant(fill_value, tf.float32)
        image = tf.pad(sample["image"] - fill, paddings + [[0, 0]]) + fill
        shift = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)
        return dict(sample, image=image, boxes=sample["boxes"] + shift)

    on = tf.random.stateless_uniform([], _sub_seed(seed, 0)) < probability
    return tf.cond(on, expand, lambda: dict(sample))


def crop(sample: dict, window, center_rule: bool = True) -> dict:
    """Crop to the integer window (x1, y1, x2, y2); clip boxes to it and drop the ones left empty.

    With ``center_rule`` (SSD) only objects whose box centre lies inside the window are kept. Mask
    grids of the boxes the window cuts are re-cropped to the part kept (clip_and_drop_empty)."""
    window = tf.cast(window, tf.int32)
    x1, y1, x2, y2 = window[0], window[1], window[2], window[3]
    boxes = sample["boxes"]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    wf = tf.cast(window, tf.float32)
    inside = (cx > wf[0]) & (cx < wf[2]) & (cy > wf[1]) & (cy < wf[3])
    if not center_rule:
        inside = tf.ones_like(inside)
    out = dict(sample, image=sample["image"][y1:y2, x1:x2],
               boxes=boxes - tf.stack([wf[0], wf[1], wf[0], wf[1]]))
    return clip_and_drop_empty(filter_objects(out, inside))


def sample_ssd_window(boxes, height, width, seed, min_iou, scale_range=(0.3, 1.0),
                      aspect_range=(0.5, 2.0), max_trials: int = 50):
    """Sample SSD crop windows and return (window float32 [4] x1y1x2y2 in whole pixels, found bool).

    ``max_trials`` windows are drawn at once (sides ~ U[scale_range] x image side, width/height in
    ``aspect_range``); the first whose IoU with at least one box is >= ``min_iou`` and that contains at
    least one box centre is returned. An image without boxes accepts any window only when
    ``min_iou`` <= -1 (no constraint).
    """
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    uniform = tf.random.stateless_uniform([4, max_trials], seed)
    cw = tf.floor((scale_range[0] + (scale_range[1] - scale_range[0]) * uniform[0]) * w)
    ch = tf.floor((scale_range[0] + (scale_range[1] - scale_range[0]) * uniform[1]) * h)
    left = tf.floor(uniform[2] * (w - cw + 1.0))
    top = tf.floor(uniform[3] * (h - ch + 1.0))
    windows = tf.stack([left, top, left + cw, top + ch], axis=-1)
    aspect = cw / tf.maximum(ch, 1.0)
    valid = (aspect >= aspect_range[0]) & (aspect <= aspect_range[1]) & (cw >= 1.0) & (ch >= 1.0)
    iou = keras_boxes.compute_iou(windows, boxes, "xyxy")  # [trials, n]
    # The extra column of -1 makes an image without boxes pass only the unconstrained option.
    best = tf.reduce_max(tf.concat([iou, tf.fill([max_trials, 1], -1.0)], axis=1), axis=1)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
    cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
    has_center = tf.reduce_any((cx[None] > windows[:, :1]) & (cx[None] < windows[:, 2:3])
                               & (cy[None] > windows[:, 1:2]) & (cy[None] < windows[:, 3:4]), axis=1)
    has_center = has_center | tf.equal(tf.shape(boxes)[0], 0)
    valid = valid & (best >= min_iou) & has_center
    chosen = windows[tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)]
    return chosen, tf.reduce_any(valid)


def ssd_random_crop(sample: dict, seed, min_ious=(0.1, 0.3, 0.5, 0.7, 0.9),
                    scale_range=(0.3, 1.0), aspect_range=(0.5, 2.0), max_trials: int = 50) -> dict:
    """SSD's random crop with IoU constraints.

    One option is drawn uniformly from: no crop, each minimum IoU in ``min_ious`` (some object must
    overlap the window at least that much), and no constraint; the window comes from
    ``sample_ssd_window``. If no sampled window qualifies the image is left uncropped. Objects whose
    centre falls outside the window are dropped, the others clipped to it.
    """
    h, w = _image_hw(sample)
    thresholds = tf.constant([2.0] + list(min_ious) + [-1.0], tf.float32)  # 2.0: never met = no crop
    option = tf.random.stateless_uniform([], _sub_seed(seed, 0), 0, len(min_ious) + 2, tf.int32)
    window, found = sample_ssd_window(sample["boxes"], h, w, _sub_seed(seed, 1), thresholds[option],
                                      scale_range, aspect_range, max_trials)
    return tf.cond(found, lambda: crop(sample, window), lambda: dict(sample))


AUGMENTATIONS = ("photometric", "expand", "crop", "flip")
PRESETS = {"none": (), "flip": ("flip",), "ssd": ("photometric", "expand", "crop", "flip")}


def resolve_augment(augment) -> tuple:
    """Normalize the ``augment`` argument: None, a preset name ("none", "flip", "ssd"), a sequence of
    step names from AUGMENTATIONS, or a callable ``f(sample, seed) -> sample``."""
    if augment is None:
        return ()
    if callable(augment):
        return (augment,)
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise ValueError(f"augment must be one of {sorted(PRESETS)} or a list of "
                             f"{AUGMENTATIONS}, got {augment!r}")
        return PRESETS[augment]
    steps = tuple(augment)
    for step in steps:
        if not callable(step) and step not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation step {step!r}; choose from {AUGMENTATIONS}")
    return steps


@tf.autograph.experimental.do_not_convert  # explicit tf.cond only; AutoGraph triples tracing time
def apply_augmentations(sample: dict, steps, seed, mean_rgb=MEAN_RGB) -> dict:
    """Run the resolved ``steps`` in order, each with its own sub-seed of ``seed``."""
    for k, step in enumerate(steps):
        s = _sub_seed(seed, 100 + k)
        if callable(step):
            sample = step(sample, s)
        elif step == "photometric":
            sample = photometric_distort(sample, s)
        elif step == "expand":
            sample = random_expand(sample, s, fill_value=mean_rgb)
        elif step == "crop":
            sample = ssd_random_crop(sample, s)
        elif step == "flip":
            sample = random_flip(sample, s)
    return sample
