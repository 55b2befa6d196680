"""The compiled-kernel loader: version check, one warning + fallback, and the environment switches."""
import json
import threading
import warnings

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.ops import _kernels, roi


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not tried yet; the real state comes back afterwards."""
    saved = dict(_kernels._state)
    for var in ("KERASDET_OPS_LIBRARY", "KERASDET_PURE_TF", "KERASDET_REQUIRE_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    _kernels._reset_for_tests()
    yield monkeypatch
    _kernels._state.update(saved)


def _fake_library(tmp_path, version, payload=b"not a shared object"):
    lib = tmp_path / "_kerasdet_ops.so"
    lib.write_bytes(payload)
    if version is not None:
        (tmp_path / "_kerasdet_ops.json").write_text(json.dumps({"tensorflow": version}))
    return lib


def _runtime_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and "kerasdet" in str(w.message)]


@pytest.mark.parametrize("case", ["mismatched_version", "no_version_file", "missing", "corrupt"])
def test_unusable_library_gives_one_warning_and_the_fallback(fresh_loader, tmp_path, case):
    if case == "mismatched_version":
        lib = _fake_library(tmp_path, "0.0.1")
        expected = "built for TensorFlow 0.0.1"
    elif case == "no_version_file":
        lib = _fake_library(tmp_path, None)
        expected = "built for TensorFlow None"
    elif case == "missing":
        lib = tmp_path / "nowhere" / "_kerasdet_ops.so"
        expected = "not found"
    else:  # right version, but not a loadable library
        lib = _fake_library(tmp_path, tf.__version__)
        expected = "failed to load"
    fresh_loader.setenv("KERASDET_OPS_LIBRARY", str(lib))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _kernels.use_kernels() is False
        assert _kernels.library() is None
        assert _kernels.use_kernels() is False
        features = tf.random.normal([1, 6, 6, 4])
        out = roi.roi_align(features, [[0.0, 0.0, 4.0, 4.0]], [0], 2)  # the fallback runs
    assert out.shape == (1, 2, 2, 4) and np.all(np.isfinite(out.numpy()))
    found = _runtime_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert expected in str(found[0].message) and "fallback" in str(found[0].message)
    status = _kernels.status()
    assert status["loaded"] is False and expected in status["reason"]
    assert status["path"] == str(lib)


@pytest.mark.parametrize("case", ["missing", "mismatched_version"])
def test_require_kernels_turns_the_fallback_into_an_error(fresh_loader, tmp_path, case):
    lib = tmp_path / "missing.so" if case == "missing" else _fake_library(tmp_path, "0.0.1")
    fresh_loader.setenv("KERASDET_OPS_LIBRARY", str(lib))
    fresh_loader.setenv("KERASDET_REQUIRE_KERNELS", "1")
    with pytest.raises(_kernels.KernelsUnavailableError, match=str(lib)):
        _kernels.library()
    assert _kernels.status()["loaded"] is False  # status() reports instead of raising


@pytest.mark.skipif(_kernels.library() is None, reason="compiled kernels not built")
def test_pure_tf_env_forces_the_fallback_graph(fresh_loader):
    fresh_loader.setenv("KERASDET_PURE_TF", "1")
    assert _kernels.library() is not None
    assert _kernels.use_kernels() is False
    assert _kernels.status()["pure_tf_forced"] is True

    @tf.function
    def pooled(f):
        return roi.roi_align(f, [[0.0, 0.0, 4.0, 4.0]], [0], 2)

    graph = pooled.get_concrete_function(tf.TensorSpec([1, 6, 6, 4])).graph
    assert not [op.type for op in graph.get_operations() if op.type.startswith("KerasDet")]


@pytest.mark.skipif(_kernels.library() is None, reason="compiled kernels not built")
def test_pure_tf_context_is_nested_and_seen_by_other_threads():
    # MirroredStrategy traces each replica's step in its own thread: the switch set around fit
    # must reach them (it used to be thread-local, and replicas traced the kernels).
    assert _kernels.use_kernels() is True
    seen = []
    with _kernels.pure_tf():
        with _kernels.pure_tf():
            assert _kernels.use_kernels() is False
        assert _kernels.use_kernels() is False
        thread = threading.Thread(target=lambda: seen.append(_kernels.use_kernels()))
        thread.start()
        thread.join()
    assert _kernels.use_kernels() is True
    assert seen == [False]


@pytest.mark.skipif(_kernels.library() is None, reason="compiled kernels not built")
def test_readable_op_names():
    lib = _kernels.library()
    assert lib.kerasdet_roi_align is lib.module.keras_det_ro_i_align
    assert lib.kerasdet_deform_ps_roi_pool_grad is lib.module.keras_det_deform_ps_ro_i_pool_grad
    assert "kerasdet_roi_align" not in dir(lib.module) and "keras_det_ro_i_align" in dir(lib)
    with pytest.raises(AttributeError, match="kerasdet_no_such_op"):
        lib.kerasdet_no_such_op


@pytest.mark.skipif(_kernels.library() is None, reason="compiled kernels not built")
def test_library_is_the_built_one_for_this_tensorflow():
    status = _kernels.status()
    assert status["loaded"] and status["reason"] is None
    info_path = status["path"].rsplit("/", 1)[0] + "/_kerasdet_ops.json"
    with open(info_path) as f:
        assert json.load(f)["tensorflow"] == tf.__version__


@pytest.mark.skipif(_kernels.library() is None, reason="compiled kernels not built")
def test_gpu_library_loads_on_cpu_only_tensorflow():
    """The CUDA build is a superset of the CPU library: on a machine without a GPU it must still
    load and run its CPU kernels (checked in a fresh process: one process can load only one of
    the two libraries)."""
    import os
    import subprocess
    import sys

    lib_dir = os.path.dirname(_kernels.status()["path"])
    gpu_lib = os.path.join(lib_dir, "_kerasdet_ops_gpu.so")
    if not os.path.exists(gpu_lib):
        pytest.skip("GPU library not built (no nvcc)")
    script = (
        "import numpy as np, tensorflow as tf\n"
        f"lib = tf.load_op_library({gpu_lib!r})\n"
        "f = tf.constant(np.arange(2 * 5 * 6 * 3, dtype=np.float32).reshape(2, 5, 6, 3))\n"
        "out = lib.keras_det_ro_i_align(features=f, boxes=[[0., 0., 4., 3.]], box_indices=[1],\n"
        "                               pooled_height=2, pooled_width=2, sampling_ratio=1)\n"
        "print(float(tf.reduce_sum(out)))\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    want = roi.roi_align(tf.reshape(tf.range(180, dtype=tf.float32), [2, 5, 6, 3]),
                         [[0.0, 0.0, 4.0, 3.0]], [1], 2, sampling_ratio=1)
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(
        float(tf.reduce_sum(want)), rel=1e-5)
