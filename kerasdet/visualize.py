"""Draw detections (boxes, "label score" captions, semi-transparent masks) onto images with Pillow.

Images are [H, W, 3] RGB (also [H, W] / [H, W, 1] gray or [H, W, 4] RGBA), uint8 or float in
0..255 as in the input pipeline; boxes are (x1, y1, x2, y2) pixels of that image. Every function
returns a new uint8 [H, W, 3] array and leaves its input untouched.
"""
import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["class_color", "draw_detections", "draw_ground_truth_and_predictions", "save_png"]

# Well separated, saturated colors for the first classes (a fixed per-class color makes pictures of
# the same model comparable); further classes walk the hue circle by the golden ratio.
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
)


def class_color(class_id):
    """The fixed RGB color of a class id (ints 0..255)."""
    class_id = int(class_id)
    if class_id < 0:
        return (255, 255, 255)
    if class_id < len(_PALETTE):
        return _PALETTE[class_id]
    hue = (class_id * 0.6180339887) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return (int(r * 255), int(g * 255), int(b * 255))


def _to_rgb_uint8(image, name="image"):
    image = np.asarray(image.numpy() if hasattr(image, "numpy") else image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"{name} must be [H, W, 3] RGB (or gray / RGBA), got shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image.copy()
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise TypeError(f"{name} must be numeric (uint8 or float 0..255), got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if image.dtype == np.uint16:
        # 16-bit images (TIFF / PNG) scale down; anything else is taken as 0..255.
        return (image >> 8).astype(np.uint8)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _check_detections(boxes, classes, scores, masks, image_shape):
    boxes = np.asarray(boxes.numpy() if hasattr(boxes, "numpy") else boxes, np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError("boxes contain NaN or infinite values")
    n = boxes.shape[0]

    def vector(value, name, dtype):
        if value is None:
            return None
        value = np.asarray(value.numpy() if hasattr(value, "numpy") else value).reshape(-1)
        if value.shape[0] != n:
            raise ValueError(f"{name} must have {n} entries to match boxes, got {value.shape[0]}")
        value = value.astype(dtype)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contain NaN or infinite values")
        return value

    classes = vector(classes, "classes", np.int64)
    scores = vector(scores, "scores", np.float64)
    if masks is not None:
        masks = np.asarray(masks.numpy() if hasattr(masks, "numpy") else masks)
        if masks.shape != (n,) + tuple(image_shape):
            raise ValueError(f"masks must have shape [{n}, {image_shape[0]}, {image_shape[1]}] "
                             f"(one image-sized mask per box), got {masks.shape}")
    return boxes, classes, scores, masks


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _caption(class_id, score, class_names):
    if class_id is None:
        label = ""
    elif class_names is not None and 0 <= class_id < len(class_names):
        label = str(class_names[class_id])
    else:
        label = str(class_id)
    if score is not None:
        label = f"{label} {score:.2f}".strip()
    return label


def draw_detections(image, boxes, classes=None, scores=None, masks=None, class_names=None,
                    score_threshold=0.0, mask_threshold=0.5, mask_alpha=0.45, line_width=None):
    """Draw boxes, "label score" captions and semi-transparent masks onto a copy of ``image``.

    Args:
      image: [H, W, 3] RGB, uint8 or float 0..255 (gray and RGBA accepted).
      boxes: [N, 4] (x1, y1, x2, y2) pixels.
      classes: optional [N] class ids (color and caption); without them every box is white.
      scores: optional [N] scores; shown in the caption and filtered by ``score_threshold``.
      masks: optional [N, H, W] image-sized masks (probabilities or binary), drawn where
        ``mask >= mask_threshold`` with opacity ``mask_alpha`` in the class color.
      class_names: optional names indexed by class id.
      line_width: box outline width; default scales with the image (about 1 px per 300 px).

    Returns:
      uint8 [H, W, 3] array.
    """
    canvas = _to_rgb_uint8(image)
    height, width = canvas.shape[:2]
    boxes, classes, scores, masks = _check_detections(boxes, classes, scores, masks, (height, width))
    keep = np.arange(boxes.shape[0])
    if scores is not None:
        keep = keep[scores >= score_threshold]
        # Lowest score first, so the most confident box and caption end up on top.
        keep = keep[np.argsort(scores[keep], kind="stable")]
    colors = [class_color(classes[i]) if classes is not None else (255, 255, 255) for i in range(len(boxes))]

    if masks is not None and keep.size:
        blended = canvas.astype(np.float64)
        for i in keep:
            region = masks[i] >= mask_threshold
            color = np.array(colors[i], np.float64)
            blended[region] = (1 - mask_alpha) * blended[region] + mask_alpha * color
        canvas = np.clip(np.round(blended), 0, 255).astype(np.uint8)

    if line_width is None:
        line_width = max(1, int(round(max(height, width) / 300)))
    font_size = max(10, int(round(max(height, width) / 45)))
    font = _font(font_size)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for i in keep:
        x1, y1, x2, y2 = np.clip(boxes[i], [0, 0, 0, 0], [width - 1, height - 1, width - 1, height - 1])
        draw.rectangle([float(x1), float(y1), float(x2), float(y2)], outline=colors[i], width=line_width)
    for i in keep:
        text = _caption(classes[i] if classes is not None else None,
                        scores[i] if scores is not None else None, class_names)
        if not text:
            continue
        x1, y1 = max(0.0, boxes[i, 0]), max(0.0, boxes[i, 1])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, font_size // 6)
        text_w, text_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box when there is room, else just inside its top edge.
        ty = y1 - text_h if y1 - text_h >= 0 else min(y1, height - text_h)
        tx = min(x1, max(0, width - text_w))
        draw.rectangle([tx, ty, tx + text_w, ty + text_h], fill=colors[i])
        r, g, b = colors[i]
        ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
        draw.text((tx + pad - left, ty + pad - top), text, fill=ink, font=font)
    return np.asarray(picture, dtype=np.uint8).copy()


def _title_band(width, text, height):
    band = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(band)
    font = _font(max(10, int(height * 0.6)))
    left, top, _, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((4 - left, (height - (bottom - top)) / 2 - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(band, np.uint8)


def draw_ground_truth_and_predictions(image, ground_truth, prediction, class_names=None,
                                      score_threshold=0.0, gap=8):
    """Ground truth (left) and predictions (right) side by side, each under a title band.

    ``ground_truth``: dict with ``boxes``, ``classes`` (or ``labels``, padding -1 dropped), optional
    ``masks``; ``prediction``: dict with ``boxes``, ``classes``, ``scores``, optional ``masks`` and
    ``num_detections`` (rows beyond it are dropped). Returns uint8 [H + title, 2 W + gap, 3].
    """
    base = _to_rgb_uint8(image)
    height, width = base.shape[:2]

    def unpack(record, what, with_scores):
        if not isinstance(record, dict) or "boxes" not in record:
            raise ValueError(f"{what} must be a dict with 'boxes'")
        classes = record.get("classes", record.get("labels"))
        boxes = np.asarray(record["boxes"]).reshape(-1, 4)
        scores = record.get("scores") if with_scores else None
        masks = record.get("masks")
        keep = np.arange(boxes.shape[0])
        if record.get("num_detections") is not None:
            keep = keep[: int(np.asarray(record["num_detections"]).reshape(-1)[0])]
        if classes is not None:
            classes = np.asarray(classes).reshape(-1)
            keep = keep[classes[keep] >= 0]
            classes = classes[keep]
        if scores is not None:
            scores = np.asarray(scores).reshape(-1)[keep]
        if masks is not None:
            masks = np.asarray(masks)[keep]
        return boxes[keep], classes, scores, masks

    gt_boxes, gt_classes, _, gt_masks = unpack(ground_truth, "ground_truth", False)
    left = draw_detections(base, gt_boxes, gt_classes, masks=gt_masks, class_names=class_names)
    p_boxes, p_classes, p_scores, p_masks = unpack(prediction, "prediction", True)
    right = draw_detections(base, p_boxes, p_classes, p_scores, p_masks, class_names, score_threshold)
    band_h = max(14, int(round(max(height, width) / 25)))
    spacer = np.full((height + band_h, gap, 3), 255, np.uint8)
    left = np.concatenate([_title_band(width, "ground truth", band_h), left], axis=0)
    right = np.concatenate([_title_band(width, "prediction", band_h), right], axis=0)
    return np.concatenate([left, spacer, right], axis=1)


def save_png(image, path):
    """Save an image array as PNG (parent folders are created); returns the path."""
    picture = Image.fromarray(_to_rgb_uint8(image))
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    picture.save(path, format="PNG")
    return path
