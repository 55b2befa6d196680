"""Do a detector's anchors fit a data set's boxes? The check `kerasdet train` prints, and the
per-level anchor sizes of `--anchor-sizes auto`.

The boxes are measured at the run's input size: each record's boxes scaled by the resize of its image
(`kerasdet.data.pipeline.resize_scale`; with several training sizes, the largest, which is also the
test size). For each box the best IoU with an anchor of every size and aspect ratio *centred on the
box* is computed. That is an upper bound: the real anchors sit on a grid (stride 4..64 px) and a box
between two centres overlaps them less, so the counts of unreachable boxes are lower bounds.
"""
import math

import numpy as np

__all__ = ["anchor_layout", "training_box_sizes", "best_anchor_iou", "anchor_fit", "format_anchor_fit",
           "auto_anchor_sizes", "parse_anchor_sizes", "UNREACHABLE_WARNING_FRACTION", "AUTO_QUANTILES"]

# Warn when more than this fraction of the boxes reaches no anchor at the RPN's positive IoU.
UNREACHABLE_WARNING_FRACTION = 0.10
# `--anchor-sizes auto` spreads the sizes from this low to this high quantile of sqrt(w * h).
AUTO_QUANTILES = (0.05, 0.95)


def anchor_layout(model):
    """(sizes per level, ratios per level, RPN positive IoU) of an anchor-based model, or None."""
    generator = getattr(model, "anchor_generator", None)
    rpn = getattr(model, "rpn_config", None)  # kerasdet.heads.rpn's RPNConfig
    if generator is None or rpn is None:
        return None
    return ([list(s) for s in generator.sizes], [list(r) for r in generator.aspect_ratios],
            float(rpn.positive_iou))


def training_box_sizes(dataset, input_settings):
    """(widths, heights) float64 [N] of the data set's boxes (crowd regions left out) in the pixels
    the network sees under ``input_settings`` (a model's / zoo entry's input dict)."""
    import tensorflow as tf

    from kerasdet.data.pipeline import resize_scale

    records = [r for r in dataset.records if r.num_objects]
    if not records:
        return np.zeros(0), np.zeros(0)
    heights = tf.constant([float(r.height) for r in records], tf.float32)
    widths = tf.constant([float(r.width) for r in records], tf.float32)
    settings = dict(input_settings)
    if settings.get("image_size"):
        new_h, new_w = resize_scale(heights, widths, image_size=settings["image_size"],
                                    keep_aspect_ratio=settings.get("keep_aspect_ratio", True))
    else:
        min_size = settings["min_size"]
        min_size = max(min_size) if isinstance(min_size, (list, tuple)) else min_size
        new_h, new_w = resize_scale(heights, widths, min_size=min_size, max_size=settings.get("max_size"))
    scale_y = np.broadcast_to(np.asarray(new_h, np.float64), heights.shape) / heights.numpy()
    scale_x = np.broadcast_to(np.asarray(new_w, np.float64), widths.shape) / widths.numpy()
    w, h = [], []
    for record, sx, sy in zip(records, scale_x, scale_y):
        boxes = record.boxes[~record.iscrowd].astype(np.float64)
        w.append((boxes[:, 2] - boxes[:, 0]) * sx)
        h.append((boxes[:, 3] - boxes[:, 1]) * sy)
    return np.concatenate(w), np.concatenate(h)


def _anchor_shapes(sizes, ratios):
    """(size, anchor w, anchor h) of every anchor type; ratio = h / w (kerasdet.ops.anchors)."""
    return [(s, s / math.sqrt(r), s * math.sqrt(r)) for s in sizes for r in ratios]


def best_anchor_iou(widths, heights, anchor_sizes, anchor_ratios):
    """(best IoU [N], size of the best anchor [N]) over every level's anchors, each centred on the box."""
    widths, heights = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    best = np.zeros(widths.shape)
    best_size = np.zeros(widths.shape)
    for sizes, ratios in zip(anchor_sizes, anchor_ratios):
        for size, aw, ah in _anchor_shapes(sizes, ratios):
            inter = np.minimum(widths, aw) * np.minimum(heights, ah)
            iou = inter / (widths * heights + aw * ah - inter)
            better = iou > best
            best = np.where(better, iou, best)
            best_size = np.where(better, size, best_size)
    return best, best_size


def anchor_fit(widths, heights, anchor_sizes, anchor_ratios, positive_iou):
    """Counts of how the boxes meet the anchors: {"boxes", "below_positive", "smaller_than_smallest",
    "rows": [{"anchor", "boxes", "median_iou", "below_positive"} per anchor size], ...}."""
    widths, heights = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    best, best_size = best_anchor_iou(widths, heights, anchor_sizes, anchor_ratios)
    side = np.sqrt(widths * heights)
    smallest = min(min(sizes) for sizes in anchor_sizes)
    rows = []
    for size in sorted({s for sizes in anchor_sizes for s in sizes}):
        mine = best_size == size
        rows.append({"anchor": float(size), "boxes": int(mine.sum()),
                     "median_iou": float(np.median(best[mine])) if mine.any() else None,
                     "below_positive": int((best[mine] < positive_iou).sum())})
    return {"boxes": int(side.size), "positive_iou": float(positive_iou),
            "below_positive": int((best < positive_iou).sum()),
            "smaller_than_smallest": int((side < smallest).sum()), "smallest_anchor": float(smallest),
            "box_side_quantiles": ({q: float(np.quantile(side, q)) for q in (0.0, 0.5, 1.0)}
                                   if side.size else {}),
            "rows": rows}


def _percent(count, total):
    return f"{100.0 * count / total:.1f} %" if total else "-"


def format_anchor_fit(fit, anchors_fitted=False):
    """The short table `kerasdet train` prints, plus a warning line when many boxes are unreachable
    (suggesting --anchor-sizes auto unless ``anchors_fitted``: the sizes came from it already)."""
    n = fit["boxes"]
    if not n:
        return "anchor fit: the training set has no boxes"
    q = fit["box_side_quantiles"]
    lines = [f"anchor fit: {n} training boxes at the run's input size, sqrt(w*h) {q[0.0]:.0f} / "
             f"{q[0.5]:.0f} / {q[1.0]:.0f} px (min / median / max); IoU with a same-centre anchor "
             "(an upper bound: real anchors sit on a grid)",
             "  anchor px   boxes best matched   median IoU   below " + f"{fit['positive_iou']:g}"]
    for row in fit["rows"]:
        median = "-" if row["median_iou"] is None else f"{row['median_iou']:.2f}"
        lines.append(f"  {row['anchor']:9.0f}   {row['boxes']:18d}   {median:>10}   {row['below_positive']:>9d}")
    lines.append(f"  smaller than the smallest anchor ({fit['smallest_anchor']:g} px): "
                 f"{fit['smaller_than_smallest']} ({_percent(fit['smaller_than_smallest'], n)}); "
                 f"no anchor at IoU >= {fit['positive_iou']:g}: {fit['below_positive']} "
                 f"({_percent(fit['below_positive'], n)})")
    if fit["below_positive"] > UNREACHABLE_WARNING_FRACTION * n:
        lines.append(f"warning: {_percent(fit['below_positive'], n)} of the training boxes reach no anchor at the "
                     f"RPN's positive IoU {fit['positive_iou']:g} (each then gets only its best anchor as a "
                     "positive)" + ("; more anchor sizes per level or aspect ratios would reach them"
                                    if anchors_fitted else "; --anchor-sizes auto fits the anchors to these boxes"))
    return "\n".join(lines)


def auto_anchor_sizes(widths, heights, sizes_per_level):
    """Per-level anchor sizes for the boxes: sum(sizes_per_level) sizes spaced evenly in log scale from
    the 5th to the 95th percentile of sqrt(w * h) (quantiles, not k-means: FPN's own anchors double
    from level to level, i.e. are evenly spaced in log scale), smallest on the finest level, rounded
    to 0.1 px. ``sizes_per_level`` keeps the model's number of anchors per level."""
    side = np.sqrt(np.asarray(widths, np.float64) * np.asarray(heights, np.float64))
    side = side[side > 0]
    if not side.size:
        raise ValueError("--anchor-sizes auto: the training set has no boxes to fit the anchors to")
    low, high = np.quantile(side, AUTO_QUANTILES)
    total = int(sum(sizes_per_level))
    sizes = np.exp(np.linspace(math.log(low), math.log(high), total)) if total > 1 else [math.sqrt(low * high)]
    sizes = [round(float(s), 1) for s in sizes]
    out, start = [], 0
    for count in sizes_per_level:
        out.append(sizes[start:start + count])
        start += count
    return out


def parse_anchor_sizes(values, num_levels, sizes_per_level):
    """``--anchor-sizes`` tokens: one per level, sizes of a level separated by commas
    ("16 32 64 128 256" for FPN, "64,128,256" for a single-level C4 model). Checks the shape
    against the model's levels and anchors per location."""
    try:
        levels = [[float(v) for v in token.split(",")] for token in values]
    except ValueError as error:
        raise ValueError(f"--anchor-sizes {' '.join(values)}: sizes must be numbers or 'auto' ({error})") from None
    if len(levels) != num_levels:
        raise ValueError(f"--anchor-sizes {' '.join(values)}: the model has {num_levels} anchor levels, "
                         f"got {len(levels)} (one token per level, sizes of a level joined by commas)")
    counts = [len(level) for level in levels]
    if counts != list(sizes_per_level):
        raise ValueError(f"--anchor-sizes {' '.join(values)}: the model has {list(sizes_per_level)} sizes per "
                         f"level, got {counts}")
    if any(s <= 0 for level in levels for s in level):
        raise ValueError(f"--anchor-sizes {' '.join(values)}: sizes must be > 0")
    return levels
