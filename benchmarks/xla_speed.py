"""Training-step speed of a tiny Faster R-CNN with and without XLA; prints one JSON.

    python benchmarks/xla_speed.py [--steps 10] [--batch 2] [--size 128]

Three settings on the same model and batch: jit_compile=False with the compiled kernels (the
default), jit_compile=False with the pure-TF fallbacks (what XLA compiles), and jit_compile=True.
Each reports the first step (tracing + XLA compilation) and the median of `--steps` later steps.
The model uses RoIAlign with sampling_ratio=2, because the adaptive sampling_ratio=0 has no
fixed-shape form (see kerasdet.ops.xla).
"""
import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet.models import FasterRCNN  # noqa: E402
from kerasdet.ops import _kernels  # noqa: E402

TINY = dict(backbone="tiny", fpn_channels=64, fc_dim=256,
            anchor_sizes=((16,), (32,), (64,), (128,), (256,)), rpn_batch_size=128,
            roi_batch_size=128, rpn_pre_nms_top_k_train=500, rpn_post_nms_top_k_train=300,
            rpn_pre_nms_top_k_test=300, rpn_post_nms_top_k_test=100, roi_sampling_ratio=2, seed=0)


def make_batch(batch_size, size):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, size * 0.6, (batch_size, 4, 2))
    wh = rng.uniform(size * 0.1, size * 0.4, (batch_size, 4, 2))
    return {"images": rng.uniform(0, 255, [batch_size, size, size, 3]).astype(np.float32),
            "bounding_boxes": {"boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
                               "labels": rng.integers(0, 3, (batch_size, 4)).astype(np.int32)},
            "image_info": np.tile(np.array([[size, size, 1, 1, size, size]], np.float32),
                                  [batch_size, 1])}


def time_steps(batch, steps, jit_compile, pure_tf):
    model = FasterRCNN(3, **TINY)
    model.compile(optimizer="sgd", jit_compile=jit_compile)
    context = _kernels.pure_tf() if pure_tf else contextlib.nullcontext()
    with context:
        start = time.perf_counter()
        logs = model.train_on_batch(batch, return_dict=True)
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            logs = model.train_on_batch(batch, return_dict=True)
            times.append(time.perf_counter() - start)
    # Under XLA the steps are traced with the fallbacks whatever the library (Detector.compile).
    kernels = _kernels.use_kernels() and not pure_tf and not model.jit_compile
    return {"jit_compile": model.jit_compile, "kernels": kernels,
            "first_step_s": round(first, 3), "median_step_s": round(float(np.median(times)), 4),
            "min_step_s": round(min(times), 4), "loss_finite": bool(np.isfinite(logs["loss"]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    batch = make_batch(args.batch, args.size)
    results = {
        "kernels_no_xla": time_steps(batch, args.steps, False, pure_tf=False),
        "pure_tf_no_xla": time_steps(batch, args.steps, False, pure_tf=True),
        "xla": time_steps(batch, args.steps, True, pure_tf=False),
    }
    base = results["kernels_no_xla"]["median_step_s"]
    report = {
        "model": "FasterRCNN tiny FPN (benchmarks/xla_speed.py TINY)", "batch": args.batch,
        "image_size": args.size, "steps_timed": args.steps,
        "devices": [d.name for d in tf.config.list_physical_devices()],
        "tensorflow": tf.__version__, "kernels": _kernels.status(), "results": results,
        "xla_speedup_vs_kernels": round(base / results["xla"]["median_step_s"], 2),
        "xla_speedup_vs_pure_tf": round(results["pure_tf_no_xla"]["median_step_s"]
                                        / results["xla"]["median_step_s"], 2),
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
