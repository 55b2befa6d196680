"""GPU self-check: one run that tells whether kerasdet works on this machine's NVIDIA GPU.

    python benchmarks/gpu_selfcheck.py [--steps 50] [--items kernels,train,timing]
                                       [--device-pair GPU:0,CPU:0] [--budget 280]

Items, each "pass" / "fail" / "skip" in one JSON printed at the end:
  1. kernels: every compiled op on device A (the GPU) against the same op on device B (the CPU
     kernels): outputs and gradients, on the shapes of tests/test_roi_ops.py and
     tests/test_deform_conv.py, with those tests' tolerances. First, that each op has a kernel
     registered for A's device type (otherwise TensorFlow would quietly run it on the CPU and the
     comparison would prove nothing).
  2. train: a tiny Faster R-CNN and a tiny Mask R-CNN each take `--steps` training steps with the
     default compile settings, then again under the mixed_float16 policy; every loss must be finite.
  3. timing: Faster R-CNN R50-FPN (random weights) inference and one training step, median times.

Exit status 1 when any item fails, else 0. Without a GPU (and without --device-pair) it says so
in the JSON and exits 0. The JSON names the kernel library loaded (`make kernels` builds the CUDA
one, _kerasdet_ops_gpu.so, when nvcc is available; the loader prefers it when a GPU is visible).
`--device-pair CPU:0,CPU:0` runs the comparisons between two CPU placements, which exercises the
comparison code on a machine without a GPU.
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

# The CUDA library holds every CPU kernel too; which one loads is decided on first use, so nothing
# may touch kerasdet.ops before TensorFlow has seen the GPUs (importing is fine: loading is lazy).
from kerasdet.ops import _kernels, deform, roi  # noqa: E402

GPU_LIBRARY = "_kerasdet_ops_gpu.so"

# Tolerances of tests/test_roi_ops.py::_assert_kernel_equals_fallback and
# tests/test_deform_conv.py::test_kernel_gradients_match_fallback.
TOLERANCES = {"output": (1e-5, 1e-5), "grad": (1e-4, 1e-4), "offsets_grad": (1e-3, 1e-4)}


# -- results ---------------------------------------------------------------------------------------
def item(name, status, **detail):
    return dict(name=name, status=status, **detail)


def compare_arrays(name, got, expected, atol, rtol):
    """One comparison as a result dict: pass when |got - expected| <= atol + rtol * |expected|."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        return item(name, "fail", reason=f"shape {got.shape} != {expected.shape}")
    if not (np.isfinite(got).all() and np.isfinite(expected).all()):
        return item(name, "fail", reason="non-finite values")
    error = np.abs(got - expected)
    excess = error - (atol + rtol * np.abs(expected))
    worst = float(excess.max()) if excess.size else -1.0
    return item(name, "pass" if worst <= 0 else "fail",
                max_abs_error=float(error.max()) if error.size else 0.0,
                atol=atol, rtol=rtol)


# -- 1. kernels ------------------------------------------------------------------------------------
def _roi_problem(channels, rois=24, seed=3):
    """tests/test_roi_ops.py::_random_problem."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, 13, 17, channels)).astype(np.float32)
    xy = rng.uniform(-8, 60, size=(rois, 2))
    wh = rng.uniform(0, 40, size=(rois, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    box_indices = rng.integers(0, 2, size=rois).astype(np.int32)
    offsets = np.random.default_rng(4).normal(size=(rois, 3, 2, 2)).astype(np.float32)
    return features, boxes, box_indices, offsets


# name -> (feature channels, op(features, boxes, box_indices, offsets)): tests/test_roi_ops.py OPS
ROI_CASES = {
    "roi_pool": (8, lambda f, b, i, o: roi.roi_pool(f, b, i, (3, 2), 0.25)),
    "ps_roi_pool": (12, lambda f, b, i, o: roi.ps_roi_pool(f, b, i, (3, 2), 0.25)),
    "ps_roi_pool_torchvision": (12, lambda f, b, i, o: roi.ps_roi_pool(
        f, b, i, (3, 2), 0.25, bin_rule="torchvision")),
    "roi_align": (8, lambda f, b, i, o: roi.roi_align(f, b, i, (3, 2), 0.25, 0, True)),
    "roi_align_legacy": (8, lambda f, b, i, o: roi.roi_align(f, b, i, (3, 2), 0.25, 2, False)),
    "ps_roi_align": (12, lambda f, b, i, o: roi.ps_roi_align(f, b, i, (3, 2), 0.25, 2)),
    "deform_roi_pool": (8, lambda f, b, i, o: roi.deform_roi_pool(f, b, i, o, (3, 2), 0.25)),
    "deform_ps_roi_pool": (12, lambda f, b, i, o: roi.deform_ps_roi_pool(f, b, i, o, (3, 2), 0.25)),
}

# tests/test_deform_conv.py CASES (the shapes), as keyword arguments of _deform_problem
DEFORM_CASES = {
    "deform_conv2d_v1": dict(),
    "deform_conv2d_v2_mask": dict(use_mask=True),
    "deform_conv2d_stride2_pad0": dict(strides=2, padding=0, h=7, w=8),
    "deform_conv2d_pair_args": dict(strides=(1, 2), padding=(2, 0), dilation=(2, 1), h=7, w=8),
    "deform_conv2d_groups2_mask": dict(groups=2, use_mask=True, c_in=4),
    "deform_conv2d_kernel_1x3": dict(k=(1, 3), padding=(0, 1)),
    "deform_conv2d_far_outside": dict(scale=6.0, use_mask=True),
}


def _deform_problem(seed=6, b=2, h=6, w=7, c_in=4, c_out=3, k=(3, 3), strides=1, padding=1,
                    dilation=1, groups=1, use_mask=False, scale=2.0):
    rng = np.random.default_rng(seed)
    h_out, w_out = deform.deform_conv2d_output_size((h, w), k, strides, padding, dilation)
    taps = groups * k[0] * k[1]
    arrays = {"inputs": rng.normal(size=(b, h, w, c_in)),
              "offsets": rng.uniform(-scale, scale, size=(b, h_out, w_out, 2 * taps)),
              "kernel": rng.normal(size=(*k, c_in, c_out))}
    if use_mask:
        arrays["mask"] = rng.uniform(0, 1, size=(b, h_out, w_out, taps))
    arrays = {key: value.astype(np.float32) for key, value in arrays.items()}
    upstream = rng.normal(size=(b, h_out, w_out, c_out)).astype(np.float32)
    options = dict(strides=strides, padding=padding, dilation=dilation, deformable_groups=groups)
    return arrays, upstream, options


def run_roi_case(name, device):
    """(output, {input name: gradient}) of one RoI op on `device`, through the compiled kernel."""
    channels, op = ROI_CASES[name]
    features, boxes, box_indices, offsets = _roi_problem(channels)
    out_channels = channels // 6 if name.startswith(("ps_", "deform_ps_")) else channels
    upstream = np.random.default_rng(5).normal(size=(len(boxes), 3, 2, out_channels)).astype(
        np.float32)
    with tf.device(device):
        f, o = tf.constant(features), tf.constant(offsets)
        with tf.GradientTape() as tape:
            tape.watch([f, o])
            out = op(f, tf.constant(boxes), tf.constant(box_indices), o)
            loss = tf.reduce_sum(out * upstream)
        grad_f, grad_o = tape.gradient(loss, [f, o])
    grads = {"features": tf.convert_to_tensor(grad_f).numpy()}
    if name.startswith("deform"):
        grads["offsets"] = tf.convert_to_tensor(grad_o).numpy()
    return out.numpy(), grads


def run_deform_case(name, device):
    arrays, upstream, options = _deform_problem(**DEFORM_CASES[name])
    with tf.device(device):
        tensors = {key: tf.constant(value) for key, value in arrays.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(tensors.values()))
            out = deform.deform_conv2d(tensors["inputs"], tensors["offsets"], tensors["kernel"],
                                       mask=tensors.get("mask"), **options)
            loss = tf.reduce_sum(out * upstream)
        grads = tape.gradient(loss, tensors)
    return out.numpy(), {key: tf.convert_to_tensor(g).numpy() for key, g in grads.items()}


def kernel_cases():
    """{case name: run(device) -> (output, gradients)} for every compiled op."""
    cases = {name: (lambda device, name=name: run_roi_case(name, device)) for name in ROI_CASES}
    cases.update({name: (lambda device, name=name: run_deform_case(name, device))
                  for name in DEFORM_CASES})
    return cases


def compare_case(name, run, device_a, device_b):
    """Runs case `name` on both devices and compares outputs and every gradient."""
    try:
        out_a, grads_a = run(device_a)
        out_b, grads_b = run(device_b)
    except Exception as error:  # a missing kernel, a launch failure: the item fails, the rest runs
        return [item(f"kernels/{name}", "fail", reason=f"{type(error).__name__}: {error}"[:500])]
    results = [compare_arrays(f"kernels/{name}/output", out_a, out_b, *TOLERANCES["output"])]
    for key in sorted(grads_b):
        tolerance = TOLERANCES["offsets_grad" if key == "offsets" else "grad"]
        results.append(compare_arrays(f"kernels/{name}/grad_{key}", grads_a.get(key),
                                      grads_b[key], *tolerance))
    return results


def registered_device_types(op_name):
    """Device types with a kernel of `op_name` registered ("CPU", "GPU")."""
    from tensorflow.python.framework import kernels

    return sorted({kernel.device_type for kernel in kernels.get_registered_kernels_for_op(
        op_name).kernel})


# Every op custom_ops/ registers (REGISTER_OP) with CPU and GPU kernels. Not the Winograd tile
# transforms: CPU-only by design (on a GPU, WinogradConv2D runs cuDNN's convolution; docs/KERNELS.md).
KERNEL_OPS = tuple(f"KerasDet>{name}{suffix}" for name in (
    "RoIPool", "PSRoIPool", "RoIAlign", "PSRoIAlign", "DeformRoIPool", "DeformPSRoIPool",
    "DeformConv2D") for suffix in ("", "Grad"))


def check_registrations(device_type):
    """Whether each op has a kernel for `device_type`: TensorFlow would otherwise run it on the CPU
    under tf.device("GPU:0") without a word, and the comparisons would compare the CPU with itself."""
    missing = [name for name in KERNEL_OPS if device_type not in registered_device_types(name)]
    return item(f"kernels/registered_on_{device_type}", "fail" if missing else "pass",
                ops=len(KERNEL_OPS), missing=missing)


def check_kernels(device_a, device_b):
    results = [check_registrations(tf.DeviceSpec.from_string("/device:" + device_a).device_type)]
    for name, run in kernel_cases().items():
        results.extend(compare_case(name, run, device_a, device_b))
    return results


# -- 2. train --------------------------------------------------------------------------------------
TINY = dict(backbone="tiny", fpn_channels=64, fc_dim=256,
            anchor_sizes=((16,), (32,), (64,), (128,), (256,)), rpn_batch_size=128,
            roi_batch_size=128, rpn_pre_nms_top_k_train=500, rpn_post_nms_top_k_train=300,
            rpn_pre_nms_top_k_test=300, rpn_post_nms_top_k_test=100, seed=0)


def training_batch(batch_size=2, size=128, mask_size=None, seed=0):
    """A padded batch of the pipeline's layout (kerasdet.data.pipeline) with random boxes."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size * 0.6, (batch_size, 3, 2))
    wh = rng.uniform(size * 0.15, size * 0.4, (batch_size, 3, 2))
    batch = {"images": rng.uniform(0, 255, [batch_size, size, size, 3]).astype(np.float32),
             "bounding_boxes": {"boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
                                "labels": rng.integers(0, 3, (batch_size, 3)).astype(np.int32)},
             "image_info": np.tile(np.array([[size, size, 1, 1, size, size]], np.float32),
                                   [batch_size, 1])}
    if mask_size:
        batch["masks"] = (rng.uniform(size=(batch_size, 3, mask_size, mask_size)) > 0.4).astype(
            np.float16)
    return batch


def train_model(kind, steps, policy=None):
    """`steps` training steps of a tiny `kind` ("faster_rcnn" / "mask_rcnn") under `policy`."""
    import keras

    from kerasdet.models import FasterRCNN, MaskRCNN

    name = f"train/{kind}" + (f"/{policy}" if policy else "")
    previous = keras.mixed_precision.global_policy()
    start = time.perf_counter()
    try:
        if policy:
            keras.mixed_precision.set_global_policy(policy)
        if kind == "mask_rcnn":
            model = MaskRCNN(3, mask_channels=32, mask_rois_per_image=16, **TINY)
            batch = training_batch(mask_size=model.mask_size)
        else:
            model = FasterRCNN(3, **TINY)
            batch = training_batch()
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))  # default jit_compile
        data = tf.data.Dataset.from_tensors(batch).repeat(steps)
        history = model.fit(data, epochs=1, verbose=0)
        losses = {key: float(values[-1]) for key, values in history.history.items()}
        finite = all(np.isfinite(value) for value in losses.values())
        return item(name, "pass" if finite else "fail", steps=steps, jit_compile=model.jit_compile,
                    compute_dtype=model.compute_dtype, final_logs=losses,
                    seconds=round(time.perf_counter() - start, 1),
                    **({} if finite else {"reason": "non-finite loss"}))
    except Exception as error:  # e.g. mixed precision not supported yet: reported, not fatal
        return item(name, "fail", reason=f"{type(error).__name__}: {error}"[:500],
                    seconds=round(time.perf_counter() - start, 1))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def check_training(steps, out_of_time):
    results = []
    for policy in (None, "mixed_float16"):
        for kind in ("faster_rcnn", "mask_rcnn"):
            name = f"train/{kind}" + (f"/{policy}" if policy else "")
            results.append(item(name, "skip", reason="time budget used up") if out_of_time()
                           else train_model(kind, steps, policy))
    return results


# -- 3. timing -------------------------------------------------------------------------------------
def median_seconds(fn, warmup=2, repeats=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check_timing(height=800, width=1088, out_of_time=lambda: False):
    """Faster R-CNN R50-FPN: predict on one image and one training step on two, median seconds.

    The outputs are read back to the host (`.numpy()`), so the times include the GPU's work."""
    import keras

    from kerasdet.models import FasterRCNN

    results = []
    try:
        model = FasterRCNN(91, backbone="resnet50")
        model.build((1, height, width, 3))
        image = tf.random.uniform([1, height, width, 3], 0, 255)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        seconds = median_seconds(lambda: model.predict_on_batch(image)["boxes"].shape)
        results.append(item("timing/faster_rcnn_r50_fpn/inference", "pass",
                            image=[height, width], batch=1, median_ms=round(1000 * seconds, 1),
                            jit_compile=model.jit_compile))
    except Exception as error:
        return [item("timing/faster_rcnn_r50_fpn/inference", "fail",
                     reason=f"{type(error).__name__}: {error}"[:500])]
    if out_of_time():
        return results + [item("timing/faster_rcnn_r50_fpn/train_step", "skip",
                               reason="time budget used up")]
    try:
        batch = training_batch(batch_size=2, size=height)
        batch["images"] = np.random.default_rng(1).uniform(
            0, 255, [2, height, width, 3]).astype(np.float32)
        batch["image_info"] = np.tile(np.array([[height, width, 1, 1, height, width]],
                                               np.float32), [2, 1])
        logs = {}

        def step():
            logs.update(model.train_on_batch(batch, return_dict=True))

        seconds = median_seconds(step, warmup=2, repeats=5)
        # With random weights (no pretrained backbone) the R50-FPN losses went non-finite within
        # the timed steps (measured on CPU), so finiteness is reported but is not the pass
        # criterion here; item 2 checks that training stays finite.
        results.append(item("timing/faster_rcnn_r50_fpn/train_step", "pass",
                            image=[height, width], batch=2, median_ms=round(1000 * seconds, 1),
                            jit_compile=model.jit_compile,
                            loss_finite=all(np.isfinite(value) for value in logs.values())))
    except Exception as error:
        results.append(item("timing/faster_rcnn_r50_fpn/train_step", "fail",
                            reason=f"{type(error).__name__}: {error}"[:500]))
    return results


# -- driver ----------------------------------------------------------------------------------------
def library_report():
    status = _kernels.status()
    path = status.get("path") or ""
    return {"loaded": status["loaded"], "file": os.path.basename(path), "path": path,
            "cuda_build": os.path.basename(path) == GPU_LIBRARY, "reason": status["reason"]}


def run(argv=None):
    """The report dict and the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="training steps per model (item 2)")
    parser.add_argument("--items", default="kernels,train,timing",
                        help="comma-separated subset of kernels, train, timing")
    parser.add_argument("--device-pair", default=None,
                        help="devices A,B to compare the kernels on (default GPU:0,CPU:0)")
    parser.add_argument("--budget", type=float, default=280.0,
                        help="seconds after which the remaining items are skipped")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    items = [name.strip() for name in args.items.split(",") if name.strip()]
    gpus = tf.config.list_physical_devices("GPU")
    report = {"gpu": [device.name for device in gpus], "tensorflow": tf.__version__}
    if not gpus and args.device_pair is None:
        report.update(status="no GPU", message="TensorFlow sees no GPU: nothing to check here.",
                      library=library_report(), items=[], ok=True)
        return report, 0
    for gpu in gpus:  # the training items must not take all the memory the timings need
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)
    device_a, device_b = (args.device_pair or "GPU:0,CPU:0").split(",")
    library = _kernels.library()
    report["library"] = library_report()
    report["device_pair"] = [device_a, device_b]
    results = []
    if gpus and not report["library"]["cuda_build"]:
        results.append(item("library/cuda_build_loaded", "fail", reason=(
            "a GPU is visible but the CUDA kernel library was not loaded "
            f"({report['library']['reason'] or report['library']['file']}); build it with "
            "`make kernels` where nvcc is on PATH")))
    out_of_time = lambda: time.perf_counter() - start > args.budget  # noqa: E731
    if "kernels" in items:
        if library is None:
            results.append(item("kernels", "fail", reason=report["library"]["reason"]))
        else:
            results.extend(check_kernels(device_a, device_b))
    if "train" in items:
        results.extend(check_training(args.steps, out_of_time))
    if "timing" in items:
        results.extend(check_timing(out_of_time=out_of_time) if not out_of_time() else
                       [item("timing", "skip", reason="time budget used up")])
    failed = [result["name"] for result in results if result["status"] == "fail"]
    report.update(items=results, failed=failed, ok=not failed,
                  seconds=round(time.perf_counter() - start, 1))
    return report, 1 if failed else 0


def main(argv=None):
    report, status = run(argv)
    json.dump(report, sys.stdout, indent=2)
    print()
    return status


if __name__ == "__main__":
    sys.exit(main())
