#!/usr/bin/env python
"""Where a detector's time goes: a TensorFlow profiler trace of inference (batch 1) or of one
training step (batch 2) at 800 x 1216, summarised as JSON (top ops by type and by name scope).

The trace (`tf.profiler.experimental`, the same data TensorBoard's profile tab shows) is read back
from its .xplane.pb; host ops are summed by their own duration. Container ops (function calls,
loops, conditionals) are left out of the sums so nothing is counted twice. The total of a profiled
call and the model's FLOPs (convolutions and matrix products of the traced graph, from
TensorFlow's own cost model) give the rate reached, reported as a fraction of the rate of one
large matrix product timed in the same run and precision ("gemm_gflops": what TensorFlow's oneDNN
attains on this host, the practical ceiling for convolutions) and, with --peak-gflops, of the CPU's
FMA peak (both cores; see docs/SPEED.md for how it was measured).

    python benchmarks/profile_models.py --model mask_rcnn_fpn --mode inference [--top 25]
        [--precision mixed_bfloat16] [--inter-op-threads 1]

With TensorFlow's default inter-op pool, independent ops overlap on the cores and each one's
duration includes the time it waited for a core (the op times of a training step summed to 1.7x
its wall time here, and oneDNN's strided filter gradients showed 2.5-4x their isolated time).
``--inter-op-threads 1`` runs one op at a time (the step took the same wall time on this 2-core
host, within its noise): the op times then add up to the wall time and say where it goes.
"""
import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

CONTAINERS = {"While", "StatelessWhile", "PartitionedCall", "StatefulPartitionedCall", "If",
              "StatelessIf", "Case", "StatelessCase", "__inference", "MapAndBatchDataset"}
ARCH = {"faster_rcnn_fpn": ("fasterrcnn_resnet50_fpn", "kerasdet.models.faster_rcnn", "FasterRCNN"),
        "mask_rcnn_fpn": ("maskrcnn_resnet50_fpn", "kerasdet.models.mask_rcnn", "MaskRCNN")}


def build(name, num_classes=80):
    import importlib

    from kerasdet.converters.torchvision import detector_config

    tv_name, module, cls_name = ARCH[name]
    model = getattr(importlib.import_module(module), cls_name)(
        **detector_config(tv_name, num_classes))
    model.build((1, 800, 1216, 3))
    return model


def graph_flops(concrete):
    """FLOPs of the convolutions and matrix products of a concrete function's graph (TF's cost
    model; ops with unknown shapes count 0)."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    opts = option_builder.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    result = model_analyzer.profile(concrete.graph, options=opts)
    return int(result.total_float_ops)


def summarise(logdir, top):
    """Per-op-type and per-name totals (ms) of the host ops in the newest trace under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    by_type, by_name, by_scope = (collections.Counter() for _ in range(3))
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                label = names.get(event.metadata_id, "")
                # "name:Type" are TF ops; executor / eager / function-run spans ("::", "Eager...")
                # enclose them and would count everything twice.
                if ":" not in label or "::" in label or label.startswith("EagerLocalExecute"):
                    continue
                op_name, _, op_type = label.rpartition(":")
                if op_type in CONTAINERS or op_type.startswith("__inference"):
                    continue
                ms = event.duration_ps / 1e9
                by_type[op_type] += ms
                by_name[label] += ms
                parts = [p for p in op_name.split("/") if p]
                by_scope["/".join(parts[:3])] += ms
    rnd = lambda c: [[k, round(v, 1)] for k, v in c.most_common(top)]  # noqa: E731
    return {"op_ms_total": round(sum(by_type.values()), 1), "by_type_ms": rnd(by_type),
            "by_scope_ms": rnd(by_scope), "by_op_ms": rnd(by_name)}


def gemm_gflops(dtype, n=4096, repeats=5):
    """GFLOP/s of the best of `repeats` n x n matrix products in `dtype` on this host."""
    a = tf.cast(tf.random.stateless_normal((n, n), seed=(0, 0)), dtype)
    product = tf.function(tf.linalg.matmul, autograph=False)
    product(a, a).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).numpy()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="faster_rcnn_fpn", choices=list(ARCH))
    parser.add_argument("--mode", default="inference", choices=["inference", "train"])
    parser.add_argument("--repeats", type=int, default=3, help="profiled calls (after warm-up)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--peak-gflops", type=float, default=None,
                        help="FMA peak of the machine (GFLOP/s, all cores), for the fraction")
    parser.add_argument("--logdir", default=None, help="keep the trace here (TensorBoard)")
    parser.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"],
                        help="Keras dtype policy of the profiled model")
    parser.add_argument("--inter-op-threads", type=int, default=None,
                        help="TensorFlow's inter-op pool size (1: op times add up to the wall time)")
    args = parser.parse_args(argv)
    if args.inter_op_threads is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    import keras

    keras.mixed_precision.set_global_policy(args.precision)
    model = build(args.model)
    rng = np.random.default_rng(0)
    if args.mode == "inference":
        images = tf.constant(rng.uniform(0, 255, (1, 800, 1216, 3)).astype(np.float32))
        fn = tf.function(lambda x: model(x, training=False))
        concrete = fn.get_concrete_function(images)
        run = lambda: tf.nest.map_structure(lambda t: t.numpy(), fn(images))  # noqa: E731
    else:
        from train_speed import BATCH, HEIGHT, WIDTH, random_problem
        from kerasdet.data.mask_grids import crop_masks_to_boxes

        images, boxes, labels, masks = random_problem()
        model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), jit_compile=False)
        batch = {"images": images, "bounding_boxes": {"boxes": boxes, "labels": labels},
                 "image_info": np.array([[HEIGHT, WIDTH, 1, 1, HEIGHT, WIDTH]] * BATCH,
                                        np.float32)}
        if args.model.startswith("mask"):
            batch["masks"] = np.stack([crop_masks_to_boxes(masks[b], boxes[b], 112).numpy()
                                       for b in range(BATCH)])
        batch = tf.nest.map_structure(tf.convert_to_tensor, batch)
        model.train_on_batch(batch)
        concrete = None
        run = lambda: model.train_on_batch(batch)  # noqa: E731
    run()
    run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    logdir = args.logdir or tempfile.mkdtemp(prefix="kerasdet-profile-")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(args.repeats):
        run()
    profiled = (time.perf_counter() - start) / args.repeats
    tf.profiler.experimental.stop()
    from train_speed import _cpu_name

    report = {"model": args.model, "mode": args.mode, "precision": args.precision,
              "cpu": _cpu_name(), "load_average": list(os.getloadavg()),
              "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
              "seconds_median_unprofiled": round(statistics.median(times), 3),
              "seconds_per_call_profiled": round(profiled, 3), "logdir": logdir}
    summary = summarise(logdir, args.top)
    for key in ("op_ms_total",):
        summary[key] = round(summary[key] / args.repeats, 1)
    for key in ("by_type_ms", "by_scope_ms", "by_op_ms"):
        summary[key] = [[k, round(v / args.repeats, 1)] for k, v in summary[key]]
    report.update(summary)
    if concrete is not None:
        flops = graph_flops(concrete)
        report["graph_gflops"] = round(flops / 1e9, 1)
        rate = flops / statistics.median(times) / 1e9
        gemm = gemm_gflops(tf.bfloat16 if args.precision == "mixed_bfloat16" else tf.float32)
        report.update(gflops_per_second=round(rate, 1), gemm_gflops=round(gemm, 1),
                      fraction_of_gemm_rate=round(rate / gemm, 3))
        if args.peak_gflops:
            report["fraction_of_fma_peak"] = round(rate / args.peak_gflops, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
