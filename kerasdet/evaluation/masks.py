"""Pasting per-box mask predictions (e.g. Mask R-CNN's 28x28 masks) into image-sized masks.

COCO mask AP compares image-sized masks. A mask head predicts an M x M grid per box; cell (i, j)
covers the box's sub-rectangle i-th row / j-th column, so its center sits at
x = x1 + (j + 0.5) * (x2 - x1) / M (same for y). An image pixel whose center (px + 0.5, py + 0.5)
lies inside the box takes the bilinear interpolation of the grid at that position (edge cells
extend to the box border); pixels outside the box are 0.

Written here rather than with tf.image.resize / Pillow: resizing to the box size rounded to whole
pixels shifts and stretches the mask by up to a pixel per side, which matters for small objects;
sampling at the exact box coordinates does not.
"""
import numpy as np

__all__ = ["paste_masks", "masks_to_original_rles"]

# Masks are pasted at the original image size this many at a time, then run-length encoded:
# a hundred 800x1333 float masks at once would take 400 MB.
_PASTE_CHUNK = 16


def paste_masks(masks, boxes, image_size):
    """Paste [N, M, M'] per-box masks into [N, H, W] image masks (float32, same value range).

    Args:
      masks: [N, Mh, Mw] per-box masks (probabilities or 0/1).
      boxes: [N, 4] (x1, y1, x2, y2) pixels, the boxes the masks were predicted for.
      image_size: (height, width) of the output.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"masks must be [N, M, M] with N = {boxes.shape[0]} boxes, got {masks.shape}")
    if not (np.all(np.isfinite(masks)) and np.all(np.isfinite(boxes))):
        raise ValueError("masks and boxes must not contain NaN or infinite values")
    height, width = (int(s) for s in image_size)
    mh, mw = masks.shape[1:]
    out = np.zeros((masks.shape[0], height, width), np.float32)
    for k, (mask, (x1, y1, x2, y2)) in enumerate(zip(masks, boxes)):
        if x2 <= x1 or y2 <= y1:
            continue
        # Pixels whose centers fall inside the box: c + 0.5 in [x1, x2).
        cols = np.arange(max(0, int(np.ceil(x1 - 0.5))), min(width, int(np.ceil(x2 - 0.5))))
        rows = np.arange(max(0, int(np.ceil(y1 - 0.5))), min(height, int(np.ceil(y2 - 0.5))))
        if cols.size == 0 or rows.size == 0:
            continue
        # Continuous grid coordinates of the pixel centers (cell centers at integers).
        u = np.clip((cols + 0.5 - x1) / (x2 - x1) * mw - 0.5, 0, mw - 1)
        v = np.clip((rows + 0.5 - y1) / (y2 - y1) * mh - 0.5, 0, mh - 1)
        u0 = np.minimum(np.floor(u).astype(int), mw - 1)
        v0 = np.minimum(np.floor(v).astype(int), mh - 1)
        u1, v1 = np.minimum(u0 + 1, mw - 1), np.minimum(v0 + 1, mh - 1)
        fu, fv = (u - u0)[None, :], (v - v0)[:, None]
        top = mask[v0][:, u0] * (1 - fu) + mask[v0][:, u1] * fu
        bottom = mask[v1][:, u0] * (1 - fu) + mask[v1][:, u1] * fu
        out[k, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = top * (1 - fv) + bottom * fv
    return out


def masks_to_original_rles(masks, boxes, info, canvas, threshold=0.5):
    """COCO RLEs at the original image size of masks predicted in the network input.

    Args:
      masks: canvas-sized [K, H, W] (their valid region, the resized image, spans the whole
        original image) or per-box grids [K, M, M] that cover ``boxes``.
      boxes: [K, 4] (x1, y1, x2, y2) in the original image's pixels.
      info: the image's image_info row (original height, width, ..., resized height, width).
      canvas: (height, width) of the network input.
      threshold: mask probability from which a pixel belongs to the object.
    """
    from kerasdet.evaluation.coco import encode_masks

    height, width = int(round(info[0])), int(round(info[1]))
    masks = np.asarray(masks)
    if tuple(masks.shape[1:]) == tuple(canvas):
        masks = masks[:, :int(round(info[4])), :int(round(info[5]))]
        boxes = np.tile([0.0, 0.0, width, height], (masks.shape[0], 1))
    rles = []
    for start in range(0, masks.shape[0], _PASTE_CHUNK):
        chunk = slice(start, start + _PASTE_CHUNK)
        pasted = paste_masks(masks[chunk], boxes[chunk], (height, width))
        rles += encode_masks(pasted, threshold) if pasted.shape[0] else []
    return rles
