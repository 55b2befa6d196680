#!/usr/bin/env python
"""The stride-1 3x3 convolutions of Faster / Mask R-CNN R50-FPN at 800 x 1216 through TensorFlow's
convolution (oneDNN) against `kerasdet.ops.winograd_conv3x3` (Winograd F(4x4, 3x3), F(2x2, 3x3) and F(6x6, 3x3):
compiled tile transforms around batched matrix products), printed as JSON.

    python benchmarks/winograd.py [--repeats 7] [--dtypes float32,bfloat16] [--batch 1] [--train]

Each shape is timed as a layer runs it: convolution + bias + ReLU (TensorFlow's fused into one
oneDNN call by grappler, ours in the output transform's pass); with --train, forward and both
gradients. The forms take turns on the same tensors (median of --repeats each), so a change of the
machine's speed during the run moves all of them. "max_error" is the largest difference from
float64 TensorFlow, divided by the largest |output|. "weighted_total" multiplies each shape's time
by the number of such layers in the models (batch 1 inference: the mask head runs 100 RoIs).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.ops import _kernels  # noqa: E402
from kerasdet.ops.winograd import winograd_conv3x3  # noqa: E402

# (name, N, H, W, Ci, Co, how many layers of the models have this shape)
SHAPES = [
    ("layer1_conv2", 1, 200, 304, 64, 64, 3),
    ("layer2_conv2", 1, 100, 152, 128, 128, 3),
    ("layer3_conv2", 1, 50, 76, 256, 256, 5),
    ("layer4_conv2", 1, 25, 38, 512, 512, 2),
    ("fpn_output2, rpn_conv P2", 1, 200, 304, 256, 256, 2),
    ("fpn_output3, rpn_conv P3", 1, 100, 152, 256, 256, 2),
    ("fpn_output4, rpn_conv P4", 1, 50, 76, 256, 256, 2),
    ("mask_fcn (100 RoIs)", 100, 14, 14, 256, 256, 4),
    ("below WINOGRAD_MIN_CHANNELS", 1, 100, 152, 32, 32, 0),
]


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=1, help="images per call (the mask head: 100 RoIs each)")
    parser.add_argument("--train", action="store_true", help="forward + gradients instead of forward only")
    args = parser.parse_args(argv)
    if _kernels.library() is None:
        sys.exit("benchmarks/winograd.py needs the compiled kernels (`make kernels`)")
    rng = np.random.default_rng(0)
    report = {"tensorflow": tf.__version__, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "mode": "train" if args.train else "inference",
              "batch": args.batch, "shapes": []}
    totals = {}
    for name, n, h, w, ci, co, count in SHAPES:
        n *= args.batch
        x64 = rng.normal(size=(n, h, w, ci))
        k64 = rng.normal(size=(3, 3, ci, co)) / np.sqrt(9 * ci)
        b64 = rng.normal(size=(co,)) * 0.1
        ref = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x64, k64, 1, "SAME"), b64)).numpy() if n * h * w * ci < 2e7 else None
        row = {"layer": name, "shape": [n, h, w, ci, co], "layers_in_model": count}
        for dtype in args.dtypes.split(","):
            x, k, b = (tf.constant(v, dtype) for v in (x64, k64, b64))
            forms = {
                "tensorflow": lambda a, c, d: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(a, c, 1, "SAME"), d)),
                "winograd4": lambda a, c, d: winograd_conv3x3(a, c, bias=d, relu=True, tile=4),
                "winograd2": lambda a, c, d: winograd_conv3x3(a, c, bias=d, relu=True, tile=2),
                "winograd6": lambda a, c, d: winograd_conv3x3(a, c, bias=d, relu=True, tile=6),
            }
            fns = {}
            for form, f in forms.items():
                if args.train:
                    def step(a, c, d, f=f):
                        with tf.GradientTape() as tape:
                            tape.watch([a, c, d])
                            y = f(a, c, d)
                        return tape.gradient(y, [a, c, d], output_gradients=tf.ones_like(y))
                    fns[form] = tf.function(step)
                else:
                    fns[form] = tf.function(f)
            errors = {}
            if ref is not None:
                for form, fn in fns.items():
                    y = tf.cast(forms[form](x, k, b), tf.float64).numpy()
                    errors[form] = float(np.abs(y - ref).max() / np.abs(ref).max())
            times = {form: [] for form in fns}
            for form, fn in fns.items():
                fn(x, k, b)  # trace and warm up
            for _ in range(args.repeats):  # taking turns
                for form, fn in fns.items():
                    times[form].append(seconds(lambda fn=fn: fn(x, k, b)))
            med = {form: statistics.median(t) for form, t in times.items()}
            entry = {f"{form}_ms": round(1e3 * t, 2) for form, t in med.items()}
            entry.update({f"{form}_over_tensorflow": round(med[form] / med["tensorflow"], 3)
                          for form in med if form != "tensorflow"})
            if errors:
                entry["max_error"] = {form: float(f"{e:.2e}") for form, e in errors.items()}
            row[dtype] = entry
            for form, t in med.items():
                totals.setdefault(dtype, {}).setdefault(form, 0.0)
                totals[dtype][form] += count * t
        report["shapes"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report["weighted_total_ms"] = {d: {f: round(1e3 * t, 1) for f, t in v.items()} for d, v in totals.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
