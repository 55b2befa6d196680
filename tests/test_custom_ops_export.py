"""SavedModel round trips of the RoI ops: with the compiled kernels, and portable (builtin ops only,
served by a Python in which kerasdet cannot even be imported)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers import DeformRoIPool
from kerasdet.ops import _kernels, roi

SPECS = [tf.TensorSpec([None, None, None, 8], tf.float32, name="features"),
         tf.TensorSpec([None, 4], tf.float32, name="boxes"),
         tf.TensorSpec([None], tf.int32, name="box_indices"),
         tf.TensorSpec([None, 2, 2, 2], tf.float32, name="offsets")]


class Pooler(tf.Module):
    """Every RoI op plus a layer with variables, behind one serving signature."""

    def __init__(self):
        super().__init__()
        self.deform = DeformRoIPool(2, 0.5, gamma=0.1)
        self.deform.build((None, None, None, 8))
        # Non-zero offset weights, so the learned offsets really move the bins in the export.
        kernel = self.deform.offset_fc.kernel
        kernel.assign(tf.random.stateless_normal(kernel.shape, [1, 2]) * 0.05)

    @tf.function(input_signature=SPECS)
    def __call__(self, features, boxes, box_indices, offsets):
        return {
            "roi_pool": roi.roi_pool(features, boxes, box_indices, 2, 0.5),
            "roi_align": roi.roi_align(features, boxes, box_indices, 2, 0.5, 0, True),
            "ps_roi_pool": roi.ps_roi_pool(features, boxes, box_indices, 2, 0.5),
            "ps_roi_align": roi.ps_roi_align(features, boxes, box_indices, 2, 0.5, 2),
            "deform_roi_pool": roi.deform_roi_pool(features, boxes, box_indices, offsets, 2, 0.5),
            "deform_ps_roi_pool": roi.deform_ps_roi_pool(features, boxes, box_indices, offsets, 2,
                                                         0.5),
            "layer": self.deform(features, boxes, box_indices),
        }


def _inputs():
    rng = np.random.default_rng(0)
    return {
        "features": rng.normal(size=(2, 9, 11, 8)).astype(np.float32),
        "boxes": np.array([[2, 3, 15, 12], [-4, -2, 8, 6], [0, 0, 22, 18]], np.float32),
        "box_indices": np.array([0, 1, 1], np.int32),
        "offsets": rng.normal(size=(3, 2, 2, 2)).astype(np.float32) * 0.5,
    }


def _saved_op_types(path):
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        return f.read()


def _expected(module, inputs):
    """Reference results from the eager pure-TF path (the same numbers as the kernels)."""
    with _kernels.pure_tf():
        eager = module.__call__.python_function  # bound to the module, not traced
        return {k: v.numpy() for k, v in eager(
            **{k: tf.constant(v) for k, v in inputs.items()}).items()}


@pytest.mark.skipif(_kernels.library() is None, reason="compiled kernels not built")
def test_saved_model_with_compiled_kernels(tmp_path):
    module = Pooler()
    inputs = _inputs()
    path = str(tmp_path / "with_kernels")
    tf.saved_model.save(module, path)
    assert b"KerasDet>RoIAlign" in _saved_op_types(path)
    loaded = tf.saved_model.load(path)  # the op library is loaded in this process
    got = loaded(**{k: tf.constant(v) for k, v in inputs.items()})
    for name, value in _expected(module, inputs).items():
        np.testing.assert_allclose(got[name].numpy(), value, atol=1e-5, err_msg=name)


def test_portable_saved_model_loads_without_kerasdet(tmp_path):
    module = Pooler()
    inputs = _inputs()
    path = str(tmp_path / "portable")
    with _kernels.pure_tf():
        tf.saved_model.save(module, path)
    assert b"KerasDet" not in _saved_op_types(path)
    np.savez(tmp_path / "inputs.npz", **inputs)

    # -I -S: no user site, no site-packages .pth files (so no editable kerasdet install), no cwd;
    # only the directory holding TensorFlow is put back on the path.
    site = os.path.dirname(os.path.dirname(tf.__file__))
    script = textwrap.dedent(f"""
        import sys
        sys.path.append({site!r})
        try:
            import kerasdet  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("kerasdet is importable in the serving process")
        import numpy as np
        import tensorflow as tf
        inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
        model = tf.saved_model.load({path!r})
        out = model(**{{k: tf.constant(v) for k, v in inputs.items()}})
        np.savez({str(tmp_path / 'outputs.npz')!r}, **{{k: v.numpy() for k, v in out.items()}})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "outputs.npz")
    want = _expected(module, inputs)
    assert sorted(got.files) == sorted(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)
    if _kernels.library() is not None:
        # ... and they are the compiled kernels' numbers too.
        kernel_out = module(**{k: tf.constant(v) for k, v in inputs.items()})
        for name in want:
            np.testing.assert_allclose(got[name], kernel_out[name].numpy(), atol=1e-5,
                                       err_msg=name)
