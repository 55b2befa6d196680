"""R-CNN's warped region crops (Girshick et al. 2014, section 2.1 and appendix A).

Every proposal, whatever its size or aspect ratio, is warped anisotropically to the CNN's fixed
input (227 x 227). Before warping the tight box is dilated so that, at the warped size, exactly
p = 16 pixels of image context surround the original box: the box's width w becomes
w * S / (S - 2p) about its centre. Pixels of the dilated box that fall outside the image take the
image mean (zero after mean subtraction), as R-CNN fills them.

The crops are bilinear samples at the centres of an S x S grid laid over the dilated box in
continuous pixel coordinates (pixel i covers [i, i + 1)): sample j of an axis sits at
x1 + (j + 0.5) * w / S, i.e. at index x1 + (j + 0.5) * w / S - 0.5 of the pixel grid, which is what
resizing the cropped region with a half-pixel-centre rule (cv2.resize, tf.image.resize) does.
tf.image.crop_and_resize does the sampling in the graph; its box is given in the normalized corner
coordinates it expects so that its first and last samples land on those centres.
"""
import tensorflow as tf

__all__ = ["context_boxes", "warp_regions"]


def context_boxes(boxes, crop_size, padding=16):
    """[..., 4] boxes dilated so that `padding` pixels of context surround them once the dilated box
    is warped to `crop_size` pixels (R-CNN's p = 16 at 227)."""
    crop_size, padding = float(crop_size), float(padding)
    if not 0 <= 2 * padding < crop_size:
        raise ValueError(f"context padding must be in [0, crop_size / 2); got padding={padding}, "
                         f"crop_size={crop_size}")
    boxes = tf.cast(boxes, tf.float32)
    scale = crop_size / (crop_size - 2.0 * padding)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2.0
    half = (boxes[..., 2:] - boxes[..., :2]) / 2.0 * scale
    return tf.concat([centre - half, centre + half], axis=-1)


def warp_regions(images, boxes, box_indices, crop_size, padding=16, fill=None):
    """R-CNN's warped crops: [N, S, S, C] float32 from `images` [B, H, W, C].

    Args:
        images: the batch (any float or integer dtype; 0..255 pixels).
        boxes: [N, 4] (x1, y1, x2, y2) in the images' pixels, the tight proposal boxes.
        box_indices: int32 [N], the image of each box.
        crop_size: S (227 for AlexNet).
        padding: context pixels at the warped scale (16 in the paper; 0 warps the tight box).
        fill: [C] colour of the pixels outside the image (the mean pixel); default 0.
    """
    images = tf.cast(images, tf.float32)
    dilated = context_boxes(boxes, crop_size, padding)
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    size = float(crop_size)
    w = dilated[:, 2] - dilated[:, 0]
    h = dilated[:, 3] - dilated[:, 1]
    # first / last sample centres in pixel-index coordinates, normalized by (extent - 1)
    x1 = (dilated[:, 0] + 0.5 * w / size - 0.5) / tf.maximum(width - 1.0, 1.0)
    x2 = (dilated[:, 2] - 0.5 * w / size - 0.5) / tf.maximum(width - 1.0, 1.0)
    y1 = (dilated[:, 1] + 0.5 * h / size - 0.5) / tf.maximum(height - 1.0, 1.0)
    y2 = (dilated[:, 3] - 0.5 * h / size - 0.5) / tf.maximum(height - 1.0, 1.0)
    normalized = tf.stack([y1, x1, y2, x2], axis=-1)
    fill = tf.zeros([tf.shape(images)[-1]]) if fill is None else tf.cast(fill, tf.float32)
    # samples outside the image take the extrapolation value: 0 on the mean-centred image
    crops = tf.image.crop_and_resize(images - fill, normalized, tf.cast(box_indices, tf.int32),
                                     [int(crop_size), int(crop_size)], extrapolation_value=0.0)
    return crops + fill
