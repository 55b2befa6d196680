"""A plain-text results table for VOC and COCO metrics (used by the training drivers and the demo)."""
import math
import numbers

__all__ = ["format_metrics_table"]

_COCO_SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def _pct(value):
    if value is None:
        return "-"
    value = float(value)
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _split(metrics):
    """Return (voc_result or None, {iou_type: coco metrics}) from any of the accepted shapes."""
    if not isinstance(metrics, dict):
        raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
    voc, coco = None, {}
    if "mAP" in metrics:
        voc = metrics
    elif "voc" in metrics:
        voc = metrics["voc"]
    for source in (metrics, metrics.get("coco") or {}):
        for iou_type in ("bbox", "segm"):
            if isinstance(source.get(iou_type), dict):
                coco[iou_type] = source[iou_type]
    if voc is None and not coco:
        raise ValueError("metrics holds neither VOC results ('mAP' / 'voc') nor COCO results "
                         f"('bbox' / 'segm' / 'coco'); keys: {sorted(metrics)}")
    return voc, coco


def format_metrics_table(metrics, class_names=None):
    """Format evaluation results as a text table: one row per class, then the summary metrics.

    Args:
      metrics: a ``voc_evaluate`` result, a ``coco_evaluate`` result, or a dict with both under
        ``"voc"`` and ``"coco"`` (as ``evaluate_model`` returns).
      class_names: optional names for integer class keys.

    Returns:
      The table as one string; APs in percent, "-" where undefined (no ground truth).
    """
    voc, coco = _split(metrics)

    def name_of(key):
        if class_names is not None and isinstance(key, numbers.Integral) and 0 <= key < len(class_names):
            return str(class_names[key])
        return str(key)

    keys = []
    for source in ([voc["AP"]] if voc else []) + [m.get("per_class_AP", {}) for m in coco.values()]:
        for key in source:
            if key not in keys:
                keys.append(key)

    columns = ["class"]
    if voc:
        columns += ["#gt", "#det", f"VOC AP{int(round(100 * voc.get('iou_threshold', 0.5)))}"]
    coco_titles = {"bbox": "box AP", "segm": "mask AP"}
    columns += [coco_titles[t] for t in coco]

    rows = []
    for key in keys:
        row = [name_of(key)]
        if voc:
            info = voc.get("per_class", {}).get(key, {})
            row += [str(info.get("num_gt", "-")), str(info.get("num_detections", "-")),
                    _pct(voc["AP"].get(key))]
        row += [_pct(m.get("per_class_AP", {}).get(key)) for m in coco.values()]
        rows.append(row)
    mean_row = ["mean"]
    if voc:
        mean_row += ["", "", _pct(voc["mAP"])]
    mean_row += [_pct(m.get("AP")) for m in coco.values()]

    widths = [max(len(r[i]) for r in [columns, mean_row] + rows) for i in range(len(columns))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

    out = [line(columns), "-" * len(line(columns))]
    out += [line(r) for r in rows]
    out += ["-" * len(line(columns)), line(mean_row), ""]
    if voc:
        kind = "11-point" if voc.get("metric") == "voc07_11point" else "all-point"
        out.append(f"VOC ({kind}, IoU {voc.get('iou_threshold', 0.5):g}): mAP {_pct(voc['mAP'])}"
                   "  (classes without ground truth are left out)")
    for iou_type, m in coco.items():
        parts = [f"{name} {_pct(m.get(name))}" for name in _COCO_SUMMARY if name in m]
        out.append(f"COCO {iou_type}: " + " | ".join(parts))
    return "\n".join(out)
