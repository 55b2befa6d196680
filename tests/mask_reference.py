"""NumPy references for instance-mask resampling, written from the definition in kerasdet.ops.masks
(independent of TensorFlow): a mask of h x w pixels covering a box has pixel (a, b) centred at
x1 + (b + 0.5) * (x2 - x1) / w (y likewise); a cell centre takes the bilinear value there, edge
pixels extend to the covered box's edge, and centres outside the covered box read 0."""
import numpy as np


def interpolation_weights(centres, low, high, pixels):
    """[len(centres), pixels] bilinear weights of positions `centres` on `pixels` pixels spanning
    [low, high); rows of centres outside [low, high) are zero."""
    centres = np.asarray(centres, np.float64)
    u = np.clip((centres - low) * pixels / max(high - low, 1e-12) - 0.5, 0, pixels - 1)
    u0 = np.floor(u).astype(int)
    u1 = np.minimum(u0 + 1, pixels - 1)
    frac = u - u0
    weights = np.zeros((len(centres), pixels))
    rows = np.arange(len(centres))
    np.add.at(weights, (rows, u0), 1 - frac)
    np.add.at(weights, (rows, u1), frac)
    weights[(centres < low) | (centres >= high)] = 0
    return weights


def resample_reference(mask, cover_box, box, size):
    """`mask` [h, w] covering `cover_box` resampled onto the size x size cells of `box`."""
    mask = np.asarray(mask, np.float64)
    h, w = mask.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    xs = x1 + (np.arange(size) + 0.5) * (x2 - x1) / size
    ys = y1 + (np.arange(size) + 0.5) * (y2 - y1) / size
    wy = interpolation_weights(ys, cover_box[1], cover_box[3], h)
    wx = interpolation_weights(xs, cover_box[0], cover_box[2], w)
    return wy @ mask @ wx.T


def boundary_pixels(binary):
    """Pixels of a binary map whose 3 x 3 neighbourhood holds both values (the object's edge)."""
    padded = np.pad(binary, 1, mode="edge")
    h, w = binary.shape
    around = np.stack([padded[i:i + h, j:j + w] for i in range(3) for j in range(3)])
    return around.min(0) != around.max(0)


def jittered_rois(rng, box, count, min_iou=0.5, bounds=None):
    """`count` boxes around `box` with IoU >= min_iou (what the sampler calls foreground)."""
    box = np.asarray(box, np.float64)
    w, h = box[2] - box[0], box[3] - box[1]
    out = []
    while len(out) < count:
        roi = box + rng.normal(0, 0.12, 4) * [w, h, w, h]
        if bounds is not None:
            roi = np.clip(roi, 0, [bounds[1], bounds[0], bounds[1], bounds[0]])
        if roi[2] - roi[0] < 1 or roi[3] - roi[1] < 1:
            continue
        iw = max(0.0, min(roi[2], box[2]) - max(roi[0], box[0]))
        ih = max(0.0, min(roi[3], box[3]) - max(roi[1], box[1]))
        inter = iw * ih
        if inter / ((roi[2] - roi[0]) * (roi[3] - roi[1]) + w * h - inter) >= min_iou:
            out.append(roi)
    return np.array(out, np.float32)
