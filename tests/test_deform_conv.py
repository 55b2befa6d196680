"""Deformable convolution: numpy reference, compiled kernel vs fallback, gradients, layer, export."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers import DeformConv2D
from kerasdet.ops import _kernels, deform_conv2d, deform_conv2d_output_size

# False when the library is missing or KERASDET_PURE_TF=1 forces the fallbacks.
HAVE_KERNELS = _kernels.use_kernels()
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="compiled kerasdet kernels not built")


# ----------------------------------------------------------------------------- numpy reference
def _bilinear_zero_outside(img, y, x):
    """Bilinear read of img [H, W, C] at (y, x); grid points outside the map are 0."""
    h, w, _ = img.shape
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    value = np.zeros(img.shape[-1])
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < h and 0 <= xx < w:
                value += (1 - abs(y - yy)) * (1 - abs(x - xx)) * img[yy, xx]
    return value


def reference_deform_conv2d(x, offsets, kernel, mask=None, strides=1, padding=0, dilation=1,
                            groups=1):
    """Direct loops over the definition of DCN v1/v2 (float64)."""
    pair = lambda v: (v, v) if np.isscalar(v) else tuple(v)  # noqa: E731
    (sh, sw), (ph, pw), (dh, dw) = pair(strides), pair(padding), pair(dilation)
    b, h, w, c_in = x.shape
    kh, kw, _, c_out = kernel.shape
    h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cg = c_in // groups
    out = np.zeros((b, h_out, w_out, c_out))
    for n in range(b):
        for i in range(h_out):
            for j in range(w_out):
                for g in range(groups):
                    for u in range(kh):
                        for v in range(kw):
                            t = u * kw + v
                            k = g * kh * kw + t
                            y = i * sh - ph + u * dh + offsets[n, i, j, 2 * k]
                            xx = j * sw - pw + v * dw + offsets[n, i, j, 2 * k + 1]
                            val = _bilinear_zero_outside(x[n, :, :, g * cg:(g + 1) * cg], y, xx)
                            if mask is not None:
                                val = val * mask[n, i, j, k]
                            out[n, i, j] += val @ kernel[u, v, g * cg:(g + 1) * cg]
    return out


def _case(rng, b=2, h=6, w=7, c_in=4, c_out=3, k=(3, 3), strides=1, padding=1, dilation=1,
          groups=1, use_mask=False, off_grid=False, scale=2.0):
    """Random problem; ``off_grid`` keeps every sample point away from integer coordinates."""
    h_out, w_out = deform_conv2d_output_size((h, w), k, strides, padding, dilation)
    taps = groups * k[0] * k[1]
    x = rng.normal(size=(b, h, w, c_in))
    kernel = rng.normal(size=(*k, c_in, c_out))
    if off_grid:
        offsets = rng.integers(-2, 2, size=(b, h_out, w_out, 2 * taps)) + rng.uniform(
            0.2, 0.8, size=(b, h_out, w_out, 2 * taps))
    else:
        offsets = rng.uniform(-scale, scale, size=(b, h_out, w_out, 2 * taps))
    mask = rng.uniform(0, 1, size=(b, h_out, w_out, taps)) if use_mask else None
    kwargs = dict(strides=strides, padding=padding, dilation=dilation)
    return x, offsets, kernel, mask, kwargs, groups


CASES = {
    "v1": dict(),
    "v2_mask": dict(use_mask=True),
    "stride2_pad0": dict(strides=2, padding=0, h=7, w=8),
    "pair_args": dict(strides=(1, 2), padding=(2, 0), dilation=(2, 1), h=7, w=8),
    "groups2_mask": dict(groups=2, use_mask=True, c_in=4),
    "kernel_1x3": dict(k=(1, 3), padding=(0, 1)),
    "far_outside": dict(scale=6.0, use_mask=True),
}


def _run(x, offsets, kernel, mask, kwargs, groups, dtype=tf.float32):
    t = lambda a: None if a is None else tf.constant(a, dtype)  # noqa: E731
    return deform_conv2d(t(x), t(offsets), t(kernel), mask=t(mask), deformable_groups=groups,
                         **kwargs).numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_fallback_matches_numpy_reference(name):
    rng = np.random.default_rng(0)
    x, offsets, kernel, mask, kwargs, groups = _case(rng, **CASES[name])
    expected = reference_deform_conv2d(x, offsets, kernel, mask, groups=groups, **kwargs)
    with _kernels.pure_tf():
        got = _run(x, offsets, kernel, mask, kwargs, groups, tf.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    with _kernels.pure_tf():
        got32 = _run(x, offsets, kernel, mask, kwargs, groups)
    np.testing.assert_allclose(got32, expected, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_numpy_reference_and_fallback(name):
    rng = np.random.default_rng(1)
    x, offsets, kernel, mask, kwargs, groups = _case(rng, **CASES[name])
    expected = reference_deform_conv2d(x, offsets, kernel, mask, groups=groups, **kwargs)
    got = _run(x, offsets, kernel, mask, kwargs, groups)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with _kernels.pure_tf():
        fallback = _run(x, offsets, kernel, mask, kwargs, groups)
    np.testing.assert_allclose(got, fallback, rtol=1e-5, atol=1e-5)


def test_samples_outside_the_map_read_zero():
    """Every sample pushed far outside the map gives exactly zero output."""
    rng = np.random.default_rng(2)
    x, offsets, kernel, _, kwargs, _ = _case(rng)
    for far in (50.0, -7.5, 1e9, -1e9):  # also beyond the int32 range of grid indices
        far_offsets = np.full_like(offsets, far)
        for pure in (True, False):
            if not pure and not HAVE_KERNELS:
                continue
            with _kernels.pure_tf() if pure else _nullcontext():
                np.testing.assert_array_equal(_run(x, far_offsets, kernel, None, kwargs, 1), 0.0)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("pure", [True, False])
def test_zero_offsets_equal_regular_convolution(pure):
    if not pure and not HAVE_KERNELS:
        pytest.skip("compiled kerasdet kernels not built")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 9, 8, 6)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 6, 5)).astype(np.float32)
    for strides, dilation in ((1, 1), (2, 1), (1, 2)):
        padding = dilation
        h_out, w_out = deform_conv2d_output_size((9, 8), 3, strides, padding, dilation)
        offsets = np.zeros((2, h_out, w_out, 18), np.float32)
        with _kernels.pure_tf() if pure else _nullcontext():
            got = deform_conv2d(x, offsets, kernel, strides=strides, padding=padding,
                                dilation=dilation).numpy()
        padded = tf.pad(x, [[0, 0], [padding] * 2, [padding] * 2, [0, 0]])
        expected = tf.nn.conv2d(padded, kernel, strides=strides, padding="VALID",
                                dilations=dilation).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_inputs_are_accepted(dtype):
    rng = np.random.default_rng(4)
    x, offsets, kernel, mask, kwargs, groups = _case(rng, use_mask=True)
    expected = reference_deform_conv2d(x, offsets, kernel, mask, groups=groups, **kwargs)
    for pure in (True, False):
        with _kernels.pure_tf() if pure else _nullcontext():
            out = deform_conv2d(tf.constant(x, dtype), tf.constant(offsets, dtype),
                                tf.constant(kernel, dtype), mask=tf.constant(mask, dtype), **kwargs)
        assert out.dtype == dtype
        # Inputs are rounded to half precision before the float32 computation.
        np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), expected, rtol=0.1,
                                   atol=0.25 * np.abs(expected).max())


# ----------------------------------------------------------------------------- gradients
def _max_gradient_error(fn, args, delta):
    # One graph call per finite difference instead of an eager op sequence: 50x faster.
    theoretical, numerical = tf.test.compute_gradient(tf.function(fn), args, delta=delta)
    return max(np.abs(t - n).max() / max(1.0, np.abs(n).max())
               for t, n in zip(theoretical, numerical))


@pytest.mark.parametrize("use_mask,groups", [(False, 1), (True, 2)])
def test_fallback_gradients_numerically(use_mask, groups):
    rng = np.random.default_rng(5)
    x, offsets, kernel, mask, kwargs, _ = _case(rng, b=1, h=3, w=3, c_in=2, c_out=2, k=(2, 2),
                                                use_mask=use_mask, groups=groups, off_grid=True,
                                                strides=1, padding=0)
    args = [tf.constant(a) for a in (x, offsets, kernel) + ((mask,) if use_mask else ())]

    def fn(x, offsets, kernel, mask=None):
        return deform_conv2d(x, offsets, kernel, mask=mask, deformable_groups=groups, **kwargs)

    with _kernels.pure_tf():
        assert _max_gradient_error(fn, args, 1e-6) < 1e-6


def _gradients(x, offsets, kernel, mask, kwargs, groups, upstream):
    tensors = [tf.constant(a, tf.float32) for a in (x, offsets, kernel)]
    m = None if mask is None else tf.constant(mask, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        if m is not None:
            tape.watch(m)
        out = deform_conv2d(*tensors, mask=m, deformable_groups=groups, **kwargs)
        loss = tf.reduce_sum(out * upstream)
    grads = tape.gradient(loss, tensors + ([m] if m is not None else []))
    return [g.numpy() for g in grads]


@needs_kernels
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_gradients_match_fallback(name):
    rng = np.random.default_rng(6)
    x, offsets, kernel, mask, kwargs, groups = _case(rng, **CASES[name])
    h_out, w_out = offsets.shape[1:3]
    upstream = rng.normal(size=(x.shape[0], h_out, w_out, kernel.shape[-1])).astype(np.float32)
    got = _gradients(x, offsets, kernel, mask, kwargs, groups, upstream)
    with _kernels.pure_tf():
        expected = _gradients(x, offsets, kernel, mask, kwargs, groups, upstream)
    for name_, g, e in zip(("inputs", "offsets", "kernel", "mask"), got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name_)


@needs_kernels
def test_kernel_gradients_numerically():
    rng = np.random.default_rng(7)
    x, offsets, kernel, mask, kwargs, _ = _case(rng, b=1, h=3, w=3, c_in=4, c_out=2, k=(2, 2),
                                                groups=2, use_mask=True, off_grid=True, padding=0)
    args = [tf.constant(a, tf.float32) for a in (x, offsets, kernel, mask)]

    def fn(x, offsets, kernel, mask):
        return deform_conv2d(x, offsets, kernel, mask=mask, deformable_groups=2, **kwargs)

    # float32 finite differences: delta large enough for precision, small enough to stay off-grid.
    assert _max_gradient_error(fn, args, 1e-2) < 2e-3


# ----------------------------------------------------------------------------- errors
def _valid_args():
    return (np.zeros((1, 5, 5, 4), np.float32), np.zeros((1, 5, 5, 18), np.float32),
            np.zeros((3, 3, 4, 2), np.float32))


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(offsets=np.zeros((1, 5, 5, 16), np.float32)), "`offsets`.*18"),
    (lambda a: dict(offsets=np.zeros((1, 4, 5, 18), np.float32)), "`offsets`.*output size"),
    (lambda a: dict(kernel=np.zeros((3, 3, 3, 2), np.float32)), "`kernel`.*input channels"),
    (lambda a: dict(mask=np.zeros((1, 5, 5, 8), np.float32)), "`mask`.*9"),
    (lambda a: dict(deformable_groups=3, offsets=np.zeros((1, 5, 5, 54), np.float32)),
     "divisible by `deformable_groups`"),
    (lambda a: dict(inputs=np.zeros((5, 5, 4), np.float32)), "`inputs`.*rank 4"),
    (lambda a: dict(inputs=np.zeros((1, 5, 5, 4), np.int32)), "`inputs`.*floating"),
    (lambda a: dict(strides=0), "`strides`"),
    (lambda a: dict(padding=(1, 1, 1)), "`padding`"),
])
def test_bad_arguments_raise_naming_the_argument(change, match):
    inputs, offsets, kernel = _valid_args()
    kwargs = dict(inputs=inputs, offsets=offsets, kernel=kernel, padding=1)
    kwargs.update(change(kwargs))
    with pytest.raises((ValueError, TypeError), match=match):
        deform_conv2d(**kwargs)


@pytest.mark.parametrize("pure", [True, False])
def test_shapes_are_checked_at_run_time(pure):
    """Shapes unknown at trace time are still checked (kernel or graph assertions), naming the argument."""
    if not pure and not HAVE_KERNELS:
        pytest.skip("compiled kerasdet kernels not built")
    inputs, _, kernel = _valid_args()
    spec = tf.TensorSpec([None, None, None, None])
    with _kernels.pure_tf() if pure else _nullcontext():
        fn = tf.function(lambda x, o, m: deform_conv2d(x, o, kernel, mask=m, padding=1),
                         input_signature=[spec, spec, spec])
        fn.get_concrete_function()
    good_mask = np.ones((1, 5, 5, 9), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="offsets"):
        fn(inputs, np.zeros((1, 4, 5, 18), np.float32), good_mask)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask"):
        fn(inputs, np.zeros((1, 5, 5, 18), np.float32), good_mask[..., :8])
    assert fn(inputs, np.zeros((1, 5, 5, 18), np.float32), good_mask).shape == (1, 5, 5, 2)


# ----------------------------------------------------------------------------- graph, layer, export
@pytest.mark.parametrize("pure", [True, False])
def test_inside_tf_function_with_unknown_shapes(pure):
    if not pure and not HAVE_KERNELS:
        pytest.skip("compiled kerasdet kernels not built")
    rng = np.random.default_rng(8)
    x, offsets, kernel, mask, kwargs, groups = _case(rng, use_mask=True)
    x, offsets, kernel, mask = (a.astype(np.float32) for a in (x, offsets, kernel, mask))
    spec = tf.TensorSpec([None, None, None, None])
    with _kernels.pure_tf() if pure else _nullcontext():
        fn = tf.function(lambda x, o, m: deform_conv2d(x, o, kernel, mask=m, **kwargs),
                         input_signature=[spec, spec, spec])
        got = fn(x, offsets, mask).numpy()
    expected = reference_deform_conv2d(x, offsets, kernel, mask, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "same"), (1, "valid"), (2, 1)])
def test_layer_at_initialization_is_a_plain_convolution(use_mask, strides, padding):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 9, 10, 4)).astype(np.float32)
    layer = DeformConv2D(5, 3, strides=strides, padding=padding, use_mask=use_mask,
                         bias_initializer="random_normal")
    out = layer(x).numpy()
    conv = keras.layers.Conv2D(5, 3, strides=strides,
                               padding=padding if isinstance(padding, str) else "valid")
    conv.build(x.shape if isinstance(padding, str) else (2, 11, 12, 4))
    # v2 starts with mask sigmoid(0) = 0.5 on every tap.
    conv.set_weights([layer.kernel.numpy() * (0.5 if use_mask else 1.0), layer.bias.numpy()])
    conv_in = x if isinstance(padding, str) else np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    expected = conv(conv_in).numpy()
    assert out.shape == expected.shape == layer.compute_output_shape(x.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_layer_config_round_trip_and_dtype_policy():
    layer = DeformConv2D(8, (3, 3), strides=1, padding=(1, 2), dilation_rate=(1, 2),
                         deformable_groups=2, use_mask=True, use_bias=False,
                         dtype="mixed_float16")
    clone = DeformConv2D.from_config(json.loads(json.dumps(layer.get_config())))
    assert clone.get_config() == layer.get_config()
    x = np.random.normal(size=(1, 8, 8, 4)).astype(np.float32)
    out = clone(x)
    assert out.dtype == tf.float16
    assert clone.kernel.dtype == "float32"
    with pytest.raises(ValueError, match="deformable_groups"):
        DeformConv2D(4, 3, deformable_groups=3)(np.zeros((1, 5, 5, 4), np.float32))


@pytest.mark.parametrize("use_mask", [False, True])
def test_model_with_layer_trains_with_fit(use_mask):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    y = np.roll(x, 1, axis=1)[..., :2] * 0.5  # a shifted target: the offsets have something to learn
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              DeformConv2D(4, 3, use_mask=use_mask),
                              keras.layers.ReLU(),
                              DeformConv2D(2, 3, use_mask=use_mask)])
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=8, batch_size=4, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.8 * first
    offset_kernel = model.layers[0].offset_conv.kernel.numpy()
    assert np.abs(offset_kernel).max() > 0  # the offsets do get gradients


def test_saved_model_under_pure_tf_loads_without_kerasdet(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(1, 7, 9, 4)).astype(np.float32)
    layer = DeformConv2D(3, 3, use_mask=True, deformable_groups=2)
    layer(x)
    # Make the offsets non-trivial so the export really exercises the sampling.
    w = layer.offset_conv.kernel
    w.assign(rng.normal(scale=0.3, size=w.shape).astype(np.float32))

    module = tf.Module()
    module.layer = layer
    export_dir = str(tmp_path / "export")
    # Saving traces every function it finds (the layer's too), so it also happens under pure_tf().
    with _kernels.pure_tf():
        module.serve = tf.function(lambda t: layer(t),
                                   input_signature=[tf.TensorSpec([None, None, None, 4])])
        expected = module.serve(x).numpy()
        tf.saved_model.save(module, export_dir)
    np.save(tmp_path / "x.npy", x)

    script = textwrap.dedent(f"""
        import sys
        sys.modules["kerasdet"] = None  # any import of kerasdet now fails
        import numpy as np
        import tensorflow as tf
        loaded = tf.saved_model.load({export_dir!r})
        out = loaded.serve(tf.constant(np.load({str(tmp_path / "x.npy")!r})))
        np.save({str(tmp_path / "out.npy")!r}, out.numpy())
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path),
                   timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)


def _op_types(fn, *args):
    graph = tf.function(fn).get_concrete_function(*args).graph
    return {op.type for op in graph.get_operations()}


def test_pure_tf_graph_uses_builtin_ops_only_and_kernel_graph_uses_the_kernel():
    x, offsets, kernel = _valid_args()
    fn = lambda x, o: deform_conv2d(x, o, kernel, padding=1)  # noqa: E731
    with _kernels.pure_tf():
        assert not any(t.startswith("KerasDet") for t in _op_types(fn, x, offsets))
    if HAVE_KERNELS:
        assert "KerasDet>DeformConv2D" in _op_types(fn, x, offsets)


def test_model_with_layer_saves_as_keras_file(tmp_path):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(2, 6, 7, 4)).astype(np.float32)
    model = keras.Sequential([keras.Input((6, 7, 4)),
                              DeformConv2D(3, 3, use_mask=True, deformable_groups=2)])
    w = model.layers[0].offset_conv.kernel
    w.assign(rng.normal(scale=0.3, size=w.shape).astype(np.float32))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


@needs_kernels
def test_saved_model_with_compiled_kernel_loads_with_the_library(tmp_path):
    """The "fast" export: the graph keeps KerasDet>DeformConv2D and needs only the .so to serve."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(1, 6, 6, 4)).astype(np.float32)
    offsets = rng.uniform(-2, 2, size=(1, 6, 6, 18)).astype(np.float32)
    kernel = tf.Variable(rng.normal(size=(3, 3, 4, 2)).astype(np.float32))
    module = tf.Module()
    module.kernel = kernel
    module.serve = tf.function(lambda a, b: deform_conv2d(a, b, kernel, padding=1),
                               input_signature=[tf.TensorSpec([None, None, None, 4]),
                                                tf.TensorSpec([None, None, None, 18])])
    expected = module.serve(x, offsets).numpy()
    export_dir = str(tmp_path / "export")
    tf.saved_model.save(module, export_dir)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "o.npy", offsets)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["kerasdet"] = None
        import numpy as np
        import tensorflow as tf
        tf.load_op_library({_kernels.status()["path"]!r})
        loaded = tf.saved_model.load({export_dir!r})
        out = loaded.serve(tf.constant(np.load({str(tmp_path / "x.npy")!r})),
                           tf.constant(np.load({str(tmp_path / "o.npy")!r})))
        np.save({str(tmp_path / "out.npy")!r}, out.numpy())
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path),
                   timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("gemm", ["avx2", "portable"])
def test_kernel_with_each_cpu_gemm_path(gemm, tmp_path):
    """The AVX2 and portable matrix products (chosen on other CPUs) against the reference."""
    rng = np.random.default_rng(14)
    # Sizes that leave partial micro-tiles on every side.
    x, offsets, kernel, mask, kwargs, groups = _case(rng, b=2, h=7, w=9, c_in=6, c_out=19,
                                                     use_mask=True, groups=2)
    upstream = rng.normal(size=offsets.shape[:3] + (19,))
    np.savez(tmp_path / "case.npz", x=x, offsets=offsets, kernel=kernel, mask=mask,
             upstream=upstream)
    with _kernels.pure_tf():
        expected = _gradients(x, offsets, kernel, mask, kwargs, groups, upstream.astype(np.float32))
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        from kerasdet.ops import deform_conv2d
        case = np.load({str(tmp_path / "case.npz")!r})
        t = [tf.constant(case[k], tf.float32) for k in ("x", "offsets", "kernel", "mask")]
        with tf.GradientTape() as tape:
            tape.watch(t)
            out = deform_conv2d(t[0], t[1], t[2], mask=t[3], deformable_groups={groups},
                                **{kwargs!r})
            loss = tf.reduce_sum(out * case["upstream"].astype(np.float32))
        np.savez({str(tmp_path / "out.npz")!r}, out=out.numpy(),
                 *[g.numpy() for g in tape.gradient(loss, t)])
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERASDET_CPU_GEMM=gemm,
               KERASDET_REQUIRE_KERNELS="1")  # no silent fallback in the subprocess
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    got = np.load(tmp_path / "out.npz")
    reference = reference_deform_conv2d(x, offsets, kernel, mask, groups=groups, **kwargs)
    np.testing.assert_allclose(got["out"], reference, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(("inputs", "offsets", "kernel", "mask")):
        np.testing.assert_allclose(got[f"arr_{i}"], expected[i], rtol=1e-4, atol=1e-4,
                                   err_msg=name)


@needs_kernels
def test_kernel_processes_large_batches_in_chunks():
    """4 images of 64 x 64 x 128 exceed the kernel's column buffer (2^24 floats): chunks of 3 + 1."""
    rng = np.random.default_rng(15)
    x, offsets, kernel, mask, kwargs, groups = _case(rng, b=4, h=64, w=64, c_in=128, c_out=3,
                                                     use_mask=True, groups=2)
    x, offsets, kernel, mask = (a.astype(np.float32) for a in (x, offsets, kernel, mask))
    upstream = rng.normal(size=offsets.shape[:3] + (3,)).astype(np.float32)
    got = _gradients(x, offsets, kernel, mask, kwargs, groups, upstream)
    out = _run(x, offsets, kernel, mask, kwargs, groups)
    with _kernels.pure_tf():
        expected = _gradients(x, offsets, kernel, mask, kwargs, groups, upstream)
        expected_out = _run(x, offsets, kernel, mask, kwargs, groups)
    np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-4)
    for name, g, e in zip(("inputs", "offsets", "kernel", "mask"), got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=2e-3 if name == "kernel" else 1e-4,
                                   err_msg=name)
