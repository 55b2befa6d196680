#!/usr/bin/env python
"""Speed of the compiled kerasdet kernels against their pure-TensorFlow fallbacks (JSON on stdout).

For each op: forward, and forward + backward (gradients for the features, and the offsets /
kernel where there are), each timed inside one tf.function, after warm-up, as the median of
repeats; the kernel and the fallback are measured in the same run so that their ratio is fair on a
busy machine. Sizes follow issue 3 (Faster R-CNN / R-FCN / DCN settings on a ~600x800 image):
  roi_align          2 x 100 x 152 x 256 map, 512 RoIs, 7x7, sampling_ratio 2
  roi_pool           2 x 50 x 76 x 256 map, 128 RoIs, 7x7 (the fallback's window gather is too
                     large for the RoIAlign size)
  ps_roi_align/pool  1 x 38 x 50 x (7*7*21 = 1029) map, 300 RoIs, k = 7
  deform_roi_pool    same as roi_align; deform_ps_roi_pool same as ps_roi_align
  deform_conv2d      1 x 50 x 76 x 256 -> 256, 3x3, padding 1 (kerasdet.ops.deform_conv2d)

With --torchvision (torch and torchvision installed), torchvision.ops' CPU implementation of the
same op on the same data is timed in the same run (its NCHW layout; the inputs are transposed once,
outside the timing), giving `speedup_vs_torchvision_*` = torchvision time / kerasdet kernel time.

Usage: python benchmarks/ops.py [--repeats 5] [--warmup 2] [--ops roi_align,ps_roi_pool] [--quick]
                                [--torchvision]
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--torchvision" in sys.argv:
    # torch must load before TensorFlow: the other order crashes in one process (measured here).
    import torch  # noqa: F401
    import torchvision.ops  # noqa: F401

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerasdet.ops as kops  # noqa: E402
from kerasdet.ops import _kernels, roi  # noqa: E402


def _boxes(rng, count, image_h, image_w):
    """Proposal-like boxes: centers anywhere, sizes from 16 px to most of the image."""
    cx = rng.uniform(0, image_w, count)
    cy = rng.uniform(0, image_h, count)
    w = np.exp(rng.uniform(np.log(16), np.log(image_w * 0.8), count))
    h = np.exp(rng.uniform(np.log(16), np.log(image_h * 0.8), count))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image_h)
    return boxes.astype(np.float32)


def _problems(quick):
    """name -> (description, callable(**tensors) -> output, {name: array}, differentiable names)."""
    rng = np.random.default_rng(0)
    shrink = 4 if quick else 1
    problems = {}

    h, w, c, rois = 100 // shrink, 152 // shrink, 256 // shrink, 512 // shrink
    feats = rng.normal(size=(2, h, w, c)).astype(np.float32)
    boxes = _boxes(rng, rois, h * 8, w * 8)
    bi = rng.integers(0, 2, rois).astype(np.int32)
    offsets = (rng.normal(size=(rois, 7, 7, 2)) * 0.5).astype(np.float32)
    base = dict(features=feats, boxes=boxes, box_indices=bi)
    desc = f"2x{h}x{w}x{c} map, {rois} RoIs, 7x7, spatial_scale 1/8"
    problems["roi_align"] = (desc + ", sampling_ratio 2", lambda features, boxes, box_indices:
                             roi.roi_align(features, boxes, box_indices, 7, 0.125, 2), base,
                             ["features"])
    # RoIPool's fallback gathers one window as large as the largest bin for every bin, which
    # needs tens of GB at the RoIAlign size; it is timed on a stride-16 map with 128 RoIs instead.
    pool_feats = rng.normal(size=(2, h // 2, w // 2, c)).astype(np.float32)
    pool_rois = max(rois // 4, 8)
    pool_base = dict(features=pool_feats, boxes=_boxes(rng, pool_rois, h * 8, w * 8),
                     box_indices=rng.integers(0, 2, pool_rois).astype(np.int32))
    problems["roi_pool"] = (f"2x{h // 2}x{w // 2}x{c} map, {pool_rois} RoIs, 7x7, spatial_scale 1/16",
                            lambda features, boxes, box_indices:
                            roi.roi_pool(features, boxes, box_indices, 7, 1 / 16), pool_base,
                            ["features"])
    problems["deform_roi_pool"] = (
        desc + ", sampling_ratio 2", lambda features, boxes, box_indices, offsets:
        roi.deform_roi_pool(features, boxes, box_indices, offsets, 7, 0.125, 2),
        dict(base, offsets=offsets), ["features", "offsets"])

    h, w, rois = 38 // (shrink // 2 or 1), 50 // (shrink // 2 or 1), 300 // shrink
    c = 7 * 7 * (21 if not quick else 4)
    feats = rng.normal(size=(1, h, w, c)).astype(np.float32)
    boxes = _boxes(rng, rois, h * 16, w * 16)
    bi = np.zeros(rois, np.int32)
    offsets = (rng.normal(size=(rois, 7, 7, 2)) * 0.5).astype(np.float32)
    base = dict(features=feats, boxes=boxes, box_indices=bi)
    desc = f"1x{h}x{w}x{c} map, {rois} RoIs, k = 7, spatial_scale 1/16"
    problems["ps_roi_align"] = (desc + ", sampling_ratio 2", lambda features, boxes, box_indices:
                                roi.ps_roi_align(features, boxes, box_indices, 7, 1 / 16, 2), base,
                                ["features"])
    problems["ps_roi_pool"] = (desc, lambda features, boxes, box_indices:
                               roi.ps_roi_pool(features, boxes, box_indices, 7, 1 / 16), base,
                               ["features"])
    problems["deform_ps_roi_pool"] = (
        desc + ", sampling_ratio 2", lambda features, boxes, box_indices, offsets:
        roi.deform_ps_roi_pool(features, boxes, box_indices, offsets, 7, 1 / 16, 2),
        dict(base, offsets=offsets), ["features", "offsets"])

    if hasattr(kops, "deform_conv2d"):
        h, w, c = 50 // shrink, 76 // shrink, 256 // shrink
        inputs = rng.normal(size=(1, h, w, c)).astype(np.float32)
        offs = (rng.normal(size=(1, h, w, 2 * 9)) * 2.0).astype(np.float32)
        kernel = (rng.normal(size=(3, 3, c, c)) * 0.05).astype(np.float32)
        problems["deform_conv2d"] = (
            f"1x{h}x{w}x{c} -> {c}, 3x3, padding 1",
            lambda inputs, offsets, kernel: kops.deform_conv2d(inputs, offsets, kernel, padding=1),
            dict(inputs=inputs, offsets=offs, kernel=kernel), ["inputs", "offsets", "kernel"])
    return problems


def _functions(fn, differentiable):
    @tf.function
    def forward(**tensors):
        return tf.reduce_sum(fn(**tensors))

    @tf.function
    def forward_backward(**tensors):
        watched = [tensors[n] for n in differentiable]
        with tf.GradientTape() as tape:
            tape.watch(watched)
            out = fn(**tensors)
            loss = tf.reduce_sum(out * out)
        grads = tape.gradient(loss, watched)
        return tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads])

    return forward, forward_backward


def _torchvision_functions(name, arrays):
    """(forward, forward_backward) closures running torchvision.ops' version, or None."""
    import torch
    import torchvision.ops as tvo

    torch.set_num_threads(os.cpu_count() or 1)
    if name == "deform_conv2d":
        x = torch.tensor(arrays["inputs"]).permute(0, 3, 1, 2).contiguous().requires_grad_()
        # kerasdet stores (dy, dx) per tap, torchvision (dy, dx) too: same channel order.
        off = torch.tensor(arrays["offsets"]).permute(0, 3, 1, 2).contiguous().requires_grad_()
        weight = torch.tensor(arrays["kernel"]).permute(3, 2, 0, 1).contiguous().requires_grad_()
        leaves = [x, off, weight]

        def run():
            return tvo.deform_conv2d(x, off, weight, padding=1)
    else:
        ops = {"roi_align": lambda f, r: tvo.roi_align(f, r, 7, 0.125, 2, aligned=True),
               "roi_pool": lambda f, r: tvo.roi_pool(f, r, 7, 1 / 16),
               "ps_roi_align": lambda f, r: tvo.ps_roi_align(f, r, 7, 1 / 16, 2),
               "ps_roi_pool": lambda f, r: tvo.ps_roi_pool(f, r, 7, 1 / 16)}
        if name not in ops:
            return None
        feats = torch.tensor(arrays["features"]).permute(0, 3, 1, 2).contiguous().requires_grad_()
        rois = torch.cat([torch.tensor(arrays["box_indices"], dtype=torch.float32)[:, None],
                          torch.tensor(arrays["boxes"])], 1)
        leaves = [feats]

        def run():
            return ops[name](feats, rois)

    def forward():
        with torch.no_grad():
            return run().sum().item()

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        out = run()
        (out * out).sum().backward()
        return sum(float(leaf.grad.sum()) for leaf in leaves)

    return forward, forward_backward


def _times_ms_plain(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2), round(1000 * min(times), 2)


def _times_ms(fn, tensors, repeats, warmup):
    """(median, min) wall time in ms; the min shows what a quiet machine would see."""
    for _ in range(warmup):
        fn(**tensors).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(**tensors).numpy()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 2), round(1000 * min(times), 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ops", default="", help="comma-separated subset of the ops")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--torchvision", action="store_true",
                        help="also time torchvision.ops on the same data (needs torch)")
    args = parser.parse_args(argv)

    report = {
        "benchmark": "kerasdet compiled kernels vs pure-TensorFlow fallbacks (CPU)",
        "tensorflow": tf.__version__,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
        "kernels": _kernels.status(),
        "results": [], "notes": [],
    }
    if _kernels.library() is None:
        report["notes"].append("compiled kernels unavailable: only the fallbacks are timed")
    if not hasattr(kops, "deform_conv2d"):
        report["notes"].append("kerasdet.ops.deform_conv2d is not there yet: skipped")
    wanted = [o for o in args.ops.split(",") if o]
    problems = _problems(args.quick)
    for name, (desc, fn, arrays, differentiable) in problems.items():
        if wanted and name not in wanted:
            continue
        tensors = {k: tf.constant(v) for k, v in arrays.items()}
        row = {"op": name, "config": desc}
        for impl in ("kernel", "fallback"):
            if impl == "kernel" and _kernels.library() is None:
                continue
            forward, forward_backward = _functions(fn, differentiable)
            with _kernels.pure_tf() if impl == "fallback" else _null():
                # Tracing happens at the first call, inside the chosen implementation.
                row[f"{impl}_forward_ms"], row[f"{impl}_forward_min_ms"] = _times_ms(
                    forward, tensors, args.repeats, args.warmup)
                row[f"{impl}_forward_backward_ms"], row[f"{impl}_forward_backward_min_ms"] = (
                    _times_ms(forward_backward, tensors, args.repeats, args.warmup))
        if "kernel_forward_ms" in row:
            row["speedup_forward"] = round(row["fallback_forward_ms"] / row["kernel_forward_ms"], 2)
            row["speedup_forward_backward"] = round(
                row["fallback_forward_backward_ms"] / row["kernel_forward_backward_ms"], 2)
        if args.torchvision:
            functions = _torchvision_functions(name, arrays)
            if functions is not None:
                row["torchvision_forward_ms"], _ = _times_ms_plain(functions[0], args.repeats,
                                                                   args.warmup)
                row["torchvision_forward_backward_ms"], _ = _times_ms_plain(
                    functions[1], args.repeats, args.warmup)
                if "kernel_forward_ms" in row:
                    row["speedup_vs_torchvision_forward"] = round(
                        row["torchvision_forward_ms"] / row["kernel_forward_ms"], 2)
                    row["speedup_vs_torchvision_forward_backward"] = round(
                        row["torchvision_forward_backward_ms"] / row["kernel_forward_backward_ms"],
                        2)
        report["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
