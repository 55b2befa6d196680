"""Box geometry in plain numpy, for code that runs outside the graph (evaluation, proposal recall,
R-CNN's SVM and regression examples) and must not import TensorFlow."""
import numpy as np

__all__ = ["pairwise_iou_numpy"]


def pairwise_iou_numpy(boxes1, boxes2):
    """IoU matrix [N, M] of (x1, y1, x2, y2) boxes, continuous coordinates; 0 where the union is 0."""
    boxes1 = np.asarray(boxes1, np.float64).reshape(-1, 4)
    boxes2 = np.asarray(boxes2, np.float64).reshape(-1, 4)
    ix1 = np.maximum(boxes1[:, None, 0], boxes2[None, :, 0])
    iy1 = np.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    ix2 = np.minimum(boxes1[:, None, 2], boxes2[None, :, 2])
    iy2 = np.minimum(boxes1[:, None, 3], boxes2[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1[:, None] + area2[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
