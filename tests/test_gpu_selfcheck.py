"""benchmarks/gpu_selfcheck.py where there is no GPU: it says so and exits 0, and its comparison
code (run CPU against CPU here) passes equal kernels and fails different ones."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.ops import _kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_selfcheck  # noqa: E402

needs_kernels = pytest.mark.skipif(not _kernels.use_kernels(),
                                   reason="compiled kerasdet kernels not built")


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is visible")
def test_without_a_gpu_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_selfcheck.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["gpu"] == [] and report["status"] == "no GPU" and report["ok"] is True
    assert report["items"] == [] and "library" in report


def test_compare_arrays_passes_within_tolerance_and_fails_otherwise():
    base = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    assert gpu_selfcheck.compare_arrays("x", base + 5e-6, base, 1e-5, 1e-5)["status"] == "pass"
    assert gpu_selfcheck.compare_arrays("x", base + 1e-3, base, 1e-5, 1e-5)["status"] == "fail"
    assert gpu_selfcheck.compare_arrays("x", base[:2], base, 1e-5, 1e-5)["status"] == "fail"
    nan = base.copy()
    nan[0, 0] = np.nan
    assert gpu_selfcheck.compare_arrays("x", nan, base, 1e-5, 1e-5)["status"] == "fail"


def test_compare_case_fails_when_the_devices_disagree_or_one_errs():
    def run(device):  # device B's gradient is off by 1e-2 in one element
        grad = np.zeros((2, 3), np.float32)
        if device == "B":
            grad[1, 2] = 1e-2
        return np.ones((2, 2), np.float32), {"features": grad}

    results = {r["name"]: r["status"] for r in gpu_selfcheck.compare_case("op", run, "A", "B")}
    assert results == {"kernels/op/output": "pass", "kernels/op/grad_features": "fail"}

    def broken(device):
        raise tf.errors.NotFoundError(None, None, "no kernel for GPU")

    (result,) = gpu_selfcheck.compare_case("op", broken, "A", "B")
    assert result["status"] == "fail" and "no kernel" in result["reason"]


@needs_kernels
def test_every_kernel_case_cpu_against_cpu_passes_and_covers_every_op():
    results = gpu_selfcheck.check_kernels("CPU:0", "CPU:0")
    assert results[0] == {"name": "kernels/registered_on_CPU", "status": "pass", "ops": 14,
                          "missing": []}
    assert all(r["status"] == "pass" for r in results), [r for r in results if r["status"] != "pass"]
    names = {r["name"] for r in results}
    # outputs and gradients of every op, offsets' gradients of the deformable ones
    assert len([n for n in names if n.endswith("/output")]) == len(gpu_selfcheck.kernel_cases())
    assert "kernels/deform_roi_pool/grad_offsets" in names
    assert "kernels/deform_conv2d_v2_mask/grad_mask" in names


@needs_kernels
def test_driver_with_a_cpu_device_pair_reports_and_exits_0():
    report, status = gpu_selfcheck.run(["--device-pair", "CPU:0,CPU:0", "--items", "kernels"])
    assert status == 0 and report["ok"] is True and report["failed"] == []
    assert report["device_pair"] == ["CPU:0", "CPU:0"]
    assert report["library"]["file"] in ("_kerasdet_ops.so", gpu_selfcheck.GPU_LIBRARY)
    assert len(report["items"]) > 40
