"""R-CNN's post-hoc region classifiers and box regressors (Girshick et al. 2014, section 2.3 and
appendix C), shared by R-CNN and SPP-net (He et al. 2014, section 4.1, "as R-CNN").

Per-class linear SVMs on a region's feature vector (fc7):
- positives: the ground-truth boxes of the class only;
- negatives: proposals whose IoU with every instance of the class is below 0.3 (grey zone
  ignored);
- hard negative mining: a negative is kept when the current SVM scores it above -1 (inside the
  margin), the cache drops those below -1.2 after each retraining (R-CNN's released code);
- solver: liblinear through scikit-learn's LinearSVC (hinge loss, dual; R-CNN's settings C = 0.001,
  positive weight 2, bias term scaled by 10), on features scaled so their mean L2 norm is 20.

Class-specific ridge regression of box deltas from pool5 features (appendix C): training pairs are
proposals with IoU > 0.6 with a ground-truth box (the one of highest IoU, its class), targets
t_x = (G_x - P_x) / P_w, t_y = (G_y - P_y) / P_h, t_w = log(G_w / P_w), t_h = log(G_h / P_h)
(centres and sizes; `kerasdet.ops.encode_boxes` with unit weights), lambda = 1000.

scikit-learn is the solver behind `fit_linear_svm` / `fit_ridge`; everything else is numpy over the
features a detector extracts (`RegionStageTrainer`).
"""
import dataclasses

import numpy as np

from kerasdet.numpy_boxes import pairwise_iou_numpy

__all__ = ["SVMSettings", "RidgeSettings", "svm_examples", "regression_pairs", "regression_targets",
           "fit_linear_svm", "fit_ridge", "feature_scale", "HardNegativeCache"]


@dataclasses.dataclass
class SVMSettings:
    """R-CNN's SVM settings (rcnn's released code: C = 1e-3, w1 = 2, B = 10, hard thresholds
    -1 / -1.2, features scaled to a mean norm of 20)."""
    C: float = 1e-3
    positive_weight: float = 2.0
    bias_scale: float = 10.0
    negative_iou: float = 0.3
    hard_threshold: float = -1.0
    evict_threshold: float = -1.2
    feature_norm: float = 20.0
    rounds: int = 2
    max_negatives_per_image: int = 200
    max_iter: int = 10000


@dataclasses.dataclass
class RidgeSettings:
    """Appendix C: lambda = 1000 and pairs with IoU > 0.6."""
    lam: float = 1000.0
    min_iou: float = 0.6
    feature_norm: float = 20.0


def svm_examples(proposals, gt_boxes, gt_labels, num_classes, negative_iou=0.3):
    """One image's SVM training examples.

    Returns (positives, negatives): positives[c] = indices into gt_boxes of class c; negatives[c] =
    indices into proposals whose IoU with every ground-truth box of class c is < negative_iou
    (proposals overlapping other classes are negatives of c)."""
    proposals = np.asarray(proposals, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    iou = pairwise_iou_numpy(proposals, gt_boxes) if len(gt_boxes) else np.zeros((len(proposals), 0))
    positives, negatives = [], []
    for c in range(num_classes):
        mine = gt_labels == c
        positives.append(np.flatnonzero(mine))
        overlap = iou[:, mine].max(axis=1) if mine.any() else np.zeros(len(proposals))
        negatives.append(np.flatnonzero(overlap < negative_iou))
    return positives, negatives


def regression_targets(proposals, targets):
    """[N, 4] (t_x, t_y, t_w, t_h) of appendix C for (x1, y1, x2, y2) proposals and target boxes."""
    p = np.asarray(proposals, np.float64).reshape(-1, 4)
    g = np.asarray(targets, np.float64).reshape(-1, 4)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    px, py = p[:, 0] + pw / 2, p[:, 1] + ph / 2
    gx, gy = g[:, 0] + gw / 2, g[:, 1] + gh / 2
    return np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


def regression_pairs(proposals, gt_boxes, gt_labels, min_iou=0.6):
    """One image's box-regression pairs: (proposal indices, their class, their targets [N, 4]) for
    proposals whose best ground-truth IoU exceeds min_iou."""
    proposals = np.asarray(proposals, np.float64).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if not len(gt_boxes) or not len(proposals):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4))
    iou = pairwise_iou_numpy(proposals, gt_boxes)
    best = iou.argmax(axis=1)
    keep = np.flatnonzero(iou[np.arange(len(proposals)), best] > min_iou)
    gt = best[keep]
    return keep, np.asarray(gt_labels)[gt].astype(np.int64), regression_targets(proposals[keep], gt_boxes[gt])


def feature_scale(features, target_norm=20.0):
    """The factor that brings the mean L2 norm of `features` [N, D] to target_norm (R-CNN scales
    all features by one such factor, measured on a sample)."""
    norms = np.linalg.norm(np.asarray(features, np.float64), axis=1)
    mean = norms.mean() if len(norms) else 0.0
    return float(target_norm / mean) if mean > 0 else 1.0


def fit_linear_svm(positives, negatives, settings=None):
    """(w [D], b) of a liblinear SVM (hinge loss, dual) separating positives [P, D] from negatives
    [N, D]; a class without positives or negatives gets w = 0, b = -1 (scores every region as
    background)."""
    settings = settings or SVMSettings()
    positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    dim = positives.shape[1] if positives.ndim == 2 and positives.size else negatives.shape[-1]
    if not len(positives) or not len(negatives):
        return np.zeros(dim), -1.0
    from sklearn.svm import LinearSVC

    x = np.concatenate([positives, negatives])
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    svm = LinearSVC(C=settings.C, loss="hinge", dual=True, class_weight={1: settings.positive_weight, 0: 1.0},
                    intercept_scaling=settings.bias_scale, max_iter=settings.max_iter)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # liblinear's dual solver stops at max_iter on hard caches; the result is still the
        # best it reached, and the next mining round retrains from the new cache.
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x, y)
    return svm.coef_[0].astype(np.float64), float(svm.intercept_[0])


def fit_ridge(features, targets, lam=1000.0):
    """(W [D, 4], b [4]) of ridge regression (scikit-learn's Ridge, alpha = lambda, unpenalized
    intercept) from features [N, D] to targets [N, 4]; no pairs give zeros (no correction)."""
    features, targets = np.asarray(features, np.float64), np.asarray(targets, np.float64)
    if not len(features):
        return None
    from sklearn.linear_model import Ridge

    ridge = Ridge(alpha=lam).fit(features, targets)
    return ridge.coef_.T.copy(), ridge.intercept_.copy()


class HardNegativeCache:
    """Per-class cache of negative feature rows keyed by (image, region), for hard negative
    mining: `add` keeps rows the current model scores above the hard threshold; `evict` drops
    those scored below the eviction threshold after retraining."""

    def __init__(self, num_classes):
        self.rows = [dict() for _ in range(num_classes)]

    def add(self, c, keys, features):
        for key, row in zip(keys, features):
            self.rows[c].setdefault(key, np.asarray(row, np.float32))

    def matrix(self, c, dim):
        rows = list(self.rows[c].values())
        return np.stack(rows) if rows else np.zeros((0, dim), np.float32)

    def evict(self, c, w, b, threshold):
        keys = list(self.rows[c])
        if not keys:
            return 0
        scores = np.stack([self.rows[c][k] for k in keys]) @ w + b
        dropped = [k for k, s in zip(keys, scores) if s < threshold]
        for k in dropped:
            del self.rows[c][k]
        return len(dropped)

    def __len__(self):
        return sum(len(r) for r in self.rows)
