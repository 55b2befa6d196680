#!/usr/bin/env python
"""Stride-1 1x1 convolutions of Faster R-CNN R50-FPN at 800 x 1216, batch 2: forward + both gradients through
`tf.nn.conv2d` (TensorFlow's gradient: oneDNN's convolution backward kernels) against
`kerasdet.ops.pointwise_conv2d` (the same forward, gradients as matrix products where they pay),
and each gradient pass alone both ways, printed as JSON.

    python benchmarks/pointwise_conv.py [--repeats 7] [--dtypes float32,bfloat16]

Everything is timed taking turns on the same tensors (median of --repeats each), so a change of the
machine's speed during the run moves all of it. "weighted_total" multiplies each shape's time by the
number of layers of that shape in the model (ResNet-50 layer2..layer4 and the FPN laterals).
The per-pass columns are what `pointwise_conv2d`'s float32 choice rests on: kernel gradient
("dw_") and input gradient ("dx_") as oneDNN's convolution backward kernel or as a matrix product.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tensorflow as tf  # noqa: E402

from kerasdet.ops.pointwise import pointwise_conv2d  # noqa: E402

BATCH = 2
# (name, H, W, Ci, Co, how many layers of the model have this shape)
SHAPES = [
    ("layer2_0_conv1", 200, 304, 256, 128, 1),
    ("layer2_conv3", 100, 152, 128, 512, 4),
    ("layer2_conv1", 100, 152, 512, 128, 3),
    ("layer3_0_conv1, fpn_lateral3", 100, 152, 512, 256, 2),
    ("layer3_conv3", 50, 76, 256, 1024, 6),
    ("layer3_conv1, fpn_lateral4", 50, 76, 1024, 256, 6),
    ("layer4_0_conv1", 50, 76, 1024, 512, 1),
    ("layer4_conv3", 25, 38, 512, 2048, 3),
    ("layer4_conv1", 25, 38, 2048, 512, 2),
    ("fpn_lateral2", 200, 304, 256, 256, 1),
    ("fpn_lateral5", 25, 38, 2048, 256, 1),
]


def step_fn(conv):
    @tf.function
    def step(x, w, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = conv(x, w)
            # <y, dy>: its gradient sends dy back through the convolution.
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
        return tape.gradient(loss, [x, w])
    return step


def tf_conv(x, w):
    return tf.nn.conv2d(x, w, 1, "VALID")


def pass_fns(shape, ci, co):
    """One gradient pass each, (x, w, dy) -> tensor: oneDNN's convolution kernel or a matrix product."""
    def rows(t, c):
        return tf.reshape(t, [-1, c])

    return {
        "dw_conv_ms": lambda x, w, dy: tf.compat.v1.nn.conv2d_backprop_filter(
            x, tf.constant([1, 1, ci, co]), dy, [1, 1, 1, 1], "VALID"),
        "dw_matmul_ms": lambda x, w, dy: tf.matmul(rows(x, ci), rows(dy, co), transpose_a=True),
        "dx_conv_ms": lambda x, w, dy: tf.compat.v1.nn.conv2d_backprop_input(
            tf.constant(shape), w, dy, [1, 1, 1, 1], "VALID"),
        "dx_matmul_ms": lambda x, w, dy: tf.matmul(rows(dy, co), tf.reshape(w, [ci, co]), transpose_b=True),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    report = {"benchmark": "pointwise_conv", "batch": BATCH, "repeats": args.repeats,
              "tensorflow": tf.__version__, "load_average_start": list(os.getloadavg()), "dtypes": {}}
    for dtype_name in args.dtypes.split(","):
        dtype = tf.as_dtype(dtype_name)
        rows, totals = [], {}
        for name, h, w, ci, co, count in SHAPES:
            rng = tf.random.Generator.from_seed(0)
            x = tf.cast(rng.normal([BATCH, h, w, ci]), dtype)
            kernel = tf.cast(rng.normal([1, 1, ci, co]) * 0.05, dtype)
            dy = tf.cast(rng.normal([BATCH, h, w, co]), dtype)
            steps = {"conv2d_gradients_ms": step_fn(tf_conv),
                     "pointwise_conv2d_ms": step_fn(pointwise_conv2d)}
            steps.update({key: tf.function(fn) for key, fn in pass_fns([BATCH, h, w, ci], ci, co).items()})
            times = {key: [] for key in steps}
            for step in steps.values():
                step(x, kernel, dy)
            for _ in range(args.repeats):
                for key, step in steps.items():
                    start = time.perf_counter()
                    tf.nest.map_structure(lambda t: t.numpy(), step(x, kernel, dy))
                    times[key].append((time.perf_counter() - start) * 1e3)
            row = {"layers": name, "input": [BATCH, h, w, ci], "filters": co, "count_in_model": count}
            for key, values in times.items():
                row[key] = round(statistics.median(values), 2)
                totals[key] = totals.get(key, 0.0) + statistics.median(values) * count
            row["ratio"] = round(row["pointwise_conv2d_ms"] / row["conv2d_gradients_ms"], 3)
            rows.append(row)
            print(json.dumps({dtype_name: row}), file=sys.stderr, flush=True)
        totals = {key: round(value, 1) for key, value in totals.items()}
        totals["ratio"] = round(totals["pointwise_conv2d_ms"] / totals["conv2d_gradients_ms"], 3)
        report["dtypes"][dtype_name] = {"shapes": rows, "weighted_total": totals}
    report["load_average_end"] = list(os.getloadavg())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
