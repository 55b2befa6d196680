"""RoI pooling ops: compiled kernels and pure-TF fallbacks against plain-numpy references.

The references below are written from the definitions in kerasdet/ops/roi.py (Fast R-CNN RoIPool,
R-FCN PSRoIPool, Mask R-CNN RoIAlign, Deformable ConvNets' deformable RoI pooling) with explicit
loops, independently of both implementations.
"""
import contextlib
import math

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.roi_layers import PSRoIPool
from kerasdet.ops import _kernels, roi

KERNELS = _kernels.library() is not None
IMPLS = ["kernel", "fallback"]


@contextlib.contextmanager
def implementation(name):
    if name == "kernel":
        if not KERNELS:
            pytest.skip("compiled kernels not built")
        yield
    else:
        with _kernels.pure_tf():
            yield


# ------------------------------------------------------------------------------------------------
# numpy references
# ------------------------------------------------------------------------------------------------

def ref_bilinear(plane, y, x):
    """RoIAlign sample of a [H, W] plane: 0 beyond one pixel outside, border-clamped inside."""
    h, w = plane.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * plane[y0, x0] + (1 - ly) * lx * plane[y0, x1]
            + ly * (1 - lx) * plane[y1, x0] + ly * lx * plane[y1, x1])


def ref_align_family(features, boxes, box_indices, ph, pw, scale, sampling_ratio, aligned,
                     position_sensitive=False, offsets=None, gamma=0.1):
    features = features.astype(np.float64)
    c = features.shape[-1]
    c_out = c // (ph * pw) if position_sensitive else c
    groups = 1 if offsets is None else offsets.shape[-1] // 2
    out = np.zeros((len(boxes), ph, pw, c_out))
    for r, box in enumerate(boxes.astype(np.float64)):
        shift = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = box * scale - shift
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bh), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(bw), 0)
        fmap = features[box_indices[r]]
        for i in range(ph):
            for j in range(pw):
                for co in range(c_out):
                    g = co // (c_out // groups)
                    dx = dy = 0.0
                    if offsets is not None:
                        dx = gamma * offsets[r, i, j, 2 * g] * rw
                        dy = gamma * offsets[r, i, j, 2 * g + 1] * rh
                    ch = (co * ph + i) * pw + j if position_sensitive else co
                    total = 0.0
                    for iy in range(gh):
                        y = y1 + i * bh + (iy + 0.5) * bh / gh + dy
                        for ix in range(gw):
                            x = x1 + j * bw + (ix + 0.5) * bw / gw + dx
                            total += ref_bilinear(fmap[:, :, ch], y, x)
                    out[r, i, j, co] = total / max(gh * gw, 1)
    return out


def ref_integer_bins(lo, hi, scale, parts, size):
    """Fast R-CNN bins along one axis, in float32 like the definition."""
    f32 = np.float32
    start = np.sign(f32(lo) * f32(scale)) * np.floor(np.abs(f32(lo) * f32(scale)) + f32(0.5))
    end = np.sign(f32(hi) * f32(scale)) * np.floor(np.abs(f32(hi) * f32(scale)) + f32(0.5))
    length = max(f32(end - start + f32(1)), f32(1))
    size_bin = f32(length / f32(parts))
    out = []
    for k in range(parts):
        first = int(min(max(np.floor(f32(k) * size_bin) + start, 0), size))
        last = int(min(max(np.ceil(f32(k + 1) * size_bin) + start, 0), size))
        out.append((first, last))
    return out


def c_round(v):
    """C's round() of a float32 value, half away from zero (|v| + 0.5 is exact in float64)."""
    v = float(np.float32(v))
    return math.copysign(math.floor(abs(v) + 0.5), v)


def ref_rfcn_bins(lo, hi, scale, parts, size):
    """R-FCN's bins along one axis (Caffe's psroi_pooling_layer.cu), float32 step by step: corners
    rounded in image pixels, then scaled; inclusive end; at least 0.1 wide; clipped to [0, size]."""
    f32 = np.float32
    start = f32(c_round(lo)) * f32(scale)
    end = f32(c_round(hi) + 1.0) * f32(scale)
    size_bin = f32(max(f32(end - start), f32(0.1)) / f32(parts))
    out = []
    for k in range(parts):
        first = math.floor(f32(f32(k) * size_bin) + start)
        last = math.ceil(f32(f32(k + 1) * size_bin) + start)
        out.append((min(max(first, 0), size), min(max(last, 0), size)))
    return out


def ref_torchvision_bins(lo, hi, scale, parts, size):
    """torchvision.ops.ps_roi_pool's bins along one axis (its CPU kernel): corners scaled then
    rounded; no inclusive end; at least 1 pixel; clipped to [0, size - 1] as its forward pass is."""
    f32 = np.float32
    start = int(c_round(f32(lo) * f32(scale)))
    end = int(c_round(f32(hi) * f32(scale)))
    size_bin = f32(f32(max(end - start, 1)) / f32(parts))
    out = []
    for k in range(parts):
        first = math.floor(f32(k) * size_bin) + start
        last = math.ceil(f32(k + 1) * size_bin) + start
        out.append((min(max(first, 0), size - 1), min(max(last, 0), size - 1)))
    return out


REF_BINS = {"fast_rcnn": ref_integer_bins, "rfcn": ref_rfcn_bins,
            "torchvision": ref_torchvision_bins}


def ref_roi_pool(features, boxes, box_indices, ph, pw, scale, position_sensitive=False,
                 rule="fast_rcnn"):
    c = features.shape[-1]
    c_out = c // (ph * pw) if position_sensitive else c
    out = np.zeros((len(boxes), ph, pw, c_out))
    h, w = features.shape[1:3]
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        rows = REF_BINS[rule](y1, y2, scale, ph, h)
        cols = REF_BINS[rule](x1, x2, scale, pw, w)
        for i, (h0, h1) in enumerate(rows):
            for j, (w0, w1) in enumerate(cols):
                if h1 <= h0 or w1 <= w0:
                    continue  # empty bin -> 0
                for co in range(c_out):
                    ch = (co * ph + i) * pw + j if position_sensitive else co
                    window = features[box_indices[r], h0:h1, w0:w1, ch].astype(np.float64)
                    out[r, i, j, co] = window.mean() if position_sensitive else window.max()
    return out


def ref_ps_roi_pool_grad(shape, boxes, box_indices, ph, pw, scale, rule, upstream):
    """d(sum(upstream * ps_roi_pool))/d(features): each bin's upstream value spread evenly over the
    pixels of its bin in its channel group."""
    grad = np.zeros(shape)
    c_out = shape[-1] // (ph * pw)
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        rows = REF_BINS[rule](y1, y2, scale, ph, shape[1])
        cols = REF_BINS[rule](x1, x2, scale, pw, shape[2])
        for i, (h0, h1) in enumerate(rows):
            for j, (w0, w1) in enumerate(cols):
                if h1 <= h0 or w1 <= w0:
                    continue
                for co in range(c_out):
                    ch = (co * ph + i) * pw + j
                    grad[box_indices[r], h0:h1, w0:w1, ch] += upstream[r, i, j, co] / (
                        (h1 - h0) * (w1 - w0))
    return grad


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def make_inputs(channels=8, batch=2, height=9, width=11, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    boxes = np.array([
        [2.2, 3.1, 15.7, 12.4],     # inside
        [-6.0, -4.0, 8.0, 6.0],     # partly outside (top-left)
        [14.0, 10.0, 30.0, 40.0],   # partly outside (bottom-right)
        [-60.0, -50.0, -30.0, -20.0],  # wholly outside
        [8.0, 8.0, 8.0, 8.0],       # zero size
        [0.0, 0.0, 22.0, 18.0],     # the whole map (scale 0.5)
        [11.3, 4.6, 6.1, 9.9],      # inverted (x2 < x1)
    ], np.float32)
    box_indices = np.array([0, 1, 0, 1, 1, 0, 1], np.int32)
    return features, boxes, box_indices


ALIGN_CASES = [  # (output_size, spatial_scale, sampling_ratio, aligned)
    ((2, 3), 0.5, 0, True),
    ((3, 2), 0.5, 2, False),
    ((2, 2), 0.25, 1, True),
    ((3, 3), 1.0, 0, False),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size,scale,ratio,aligned", ALIGN_CASES)
def test_roi_align_matches_reference(impl, size, scale, ratio, aligned):
    features, boxes, bi = make_inputs()
    with implementation(impl):
        got = roi.roi_align(features, boxes, bi, size, scale, ratio, aligned).numpy()
    want = ref_align_family(features, boxes, bi, *size, scale, ratio, aligned)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size,scale", [((2, 2), 0.5), ((3, 2), 1.0), ((2, 3), 0.25)])
def test_roi_pool_matches_reference(impl, size, scale):
    features, boxes, bi = make_inputs()
    with implementation(impl):
        got = roi.roi_pool(features, boxes, bi, size, scale).numpy()
    want = ref_roi_pool(features, boxes, bi, *size, scale)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# Corners on whole and half pixels (rounding ties before and after scaling), the largest float32
# below 0.5 (where floor(v + 0.5) and C's round disagree), and boxes ending on the last row and
# column: the cases where the bin rules part.
PS_TIE_BOXES = np.array([
    [3.0, 5.0, 17.0, 13.0],
    [-3.0, -1.0, 1.0, 3.0],
    [0.5, 1.5, 20.5, 16.5],
    [0.49999997, 0.49999997, 4.5, 6.5],
    [19.0, 15.0, 21.0, 17.0],
    [0.99, 0.99, 21.01, 17.01],
    [-2.5, -4.5, 2.5, 4.5],
], np.float32)


def ps_inputs(channels):
    features, boxes, bi = make_inputs(channels=channels)
    boxes = np.concatenate([boxes, PS_TIE_BOXES])
    bi = np.concatenate([bi, np.arange(len(PS_TIE_BOXES)) % 2]).astype(np.int32)
    return features, boxes, bi


PS_POOL_CASES = [((2, 2), 0.5), ((3, 2), 1.0), ((2, 3), 0.25)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", [None, "rfcn", "torchvision"])
@pytest.mark.parametrize("size,scale", PS_POOL_CASES)
def test_ps_roi_pool_matches_reference(impl, rule, size, scale):
    # rule None: the default, which is R-FCN's.
    features, boxes, bi = ps_inputs(channels=2 * size[0] * size[1])
    kwargs = {} if rule is None else {"bin_rule": rule}
    with implementation(impl):
        got = roi.ps_roi_pool(features, boxes, bi, size, scale, **kwargs).numpy()
    want = ref_roi_pool(features, boxes, bi, *size, scale, position_sensitive=True,
                        rule=rule or "rfcn")
    assert got.shape == (len(boxes), size[0], size[1], 2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,scale", PS_POOL_CASES)
def test_ps_roi_pool_test_boxes_tell_the_bin_rules_apart(size, scale):
    # The references differ on these inputs, so the tests above can tell a rule from another.
    features, boxes, bi = ps_inputs(channels=2 * size[0] * size[1])
    refs = {rule: ref_roi_pool(features, boxes, bi, *size, scale, position_sensitive=True,
                               rule=rule) for rule in REF_BINS}
    for a, b in (("rfcn", "torchvision"), ("rfcn", "fast_rcnn"), ("torchvision", "fast_rcnn")):
        assert np.abs(refs[a] - refs[b]).max() > 0.1, (a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", ["rfcn", "torchvision"])
def test_ps_roi_pool_gradient_matches_reference(impl, rule):
    features, boxes, bi = ps_inputs(channels=2 * 6)
    upstream = np.random.default_rng(8).normal(size=(len(boxes), 3, 2, 2)).astype(np.float32)
    f = tf.constant(features)
    with implementation(impl), tf.GradientTape() as tape:
        tape.watch(f)
        loss = tf.reduce_sum(roi.ps_roi_pool(f, boxes, bi, (3, 2), 0.5, bin_rule=rule) * upstream)
    got = tf.convert_to_tensor(tape.gradient(loss, f)).numpy()
    want = ref_ps_roi_pool_grad(features.shape, boxes, bi, 3, 2, 0.5, rule, upstream)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_torchvision_bin_rule_matches_torchvision(torch_reference):
    """bin_rule="torchvision" against torchvision.ops.ps_roi_pool itself (run in a subprocess,
    tests/torch_refs/ps_roi_pool.py), and the numpy reference against it too."""
    cases = np.load(torch_reference("ps_roi_pool") / "cases.npz")
    names = sorted({key.split("/")[0] for key in cases.files})
    assert len(names) == 5
    for name in names:
        case = {key.split("/")[1]: cases[key] for key in cases.files if key.startswith(name + "/")}
        size, scale = tuple(int(v) for v in case["output_size"]), float(case["spatial_scale"])
        want = case["output"]
        assert np.abs(want).max() > 0
        ref = ref_roi_pool(case["features"], case["boxes"], case["box_indices"], *size, scale,
                           position_sensitive=True, rule="torchvision")
        np.testing.assert_allclose(ref, want, atol=1e-5, rtol=1e-5, err_msg=name)
        for impl in IMPLS:
            if impl == "kernel" and not KERNELS:
                continue
            f = tf.constant(case["features"])
            with implementation(impl), tf.GradientTape() as tape:
                tape.watch(f)
                out = roi.ps_roi_pool(f, case["boxes"], case["box_indices"], size, scale,
                                      bin_rule="torchvision")
                loss = tf.reduce_sum(out * case["upstream"])
            np.testing.assert_allclose(out.numpy(), want, atol=1e-5, rtol=1e-5,
                                       err_msg=f"{name} {impl}")
            if name == "interior_gradient":  # see tests/torch_refs/ps_roi_pool.py
                grad = tf.convert_to_tensor(tape.gradient(loss, f)).numpy()
                np.testing.assert_allclose(grad, case["grad_features"], atol=1e-5, rtol=1e-5,
                                           err_msg=f"{name} {impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_bin_rule_names_the_argument(impl):
    features, boxes, bi = ps_inputs(channels=8)
    with implementation(impl), pytest.raises(ValueError, match="bin_rule"):
        roi.ps_roi_pool(features, boxes, bi, 2, 0.5, bin_rule="caffe")
    with pytest.raises(ValueError, match="bin_rule"):
        PSRoIPool(2, 0.5, bin_rule="fast_rcnn")


def test_ps_roi_pool_layer_passes_its_bin_rule_and_keeps_it_in_its_config():
    features, boxes, bi = ps_inputs(channels=8)
    for rule in ("rfcn", "torchvision"):
        layer = PSRoIPool.from_config(PSRoIPool(2, 0.5, bin_rule=rule).get_config())
        assert layer.bin_rule == rule
        np.testing.assert_allclose(layer(features, boxes, bi).numpy(),
                                   ref_roi_pool(features, boxes, bi, 2, 2, 0.5, True, rule),
                                   atol=1e-5, rtol=1e-5)
    assert PSRoIPool(2).bin_rule == "rfcn"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size,scale,ratio", [((2, 2), 0.5, 0), ((3, 2), 0.5, 2)])
def test_ps_roi_align_matches_reference(impl, size, scale, ratio):
    features, boxes, bi = make_inputs(channels=3 * size[0] * size[1])
    with implementation(impl):
        got = roi.ps_roi_align(features, boxes, bi, size, scale, ratio).numpy()
    want = ref_align_family(features, boxes, bi, *size, scale, ratio, True, position_sensitive=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups,aligned,ratio", [(1, True, 0), (2, False, 2)])
def test_deform_roi_pool_matches_reference(impl, groups, aligned, ratio):
    features, boxes, bi = make_inputs()
    rng = np.random.default_rng(1)
    offsets = rng.normal(size=(len(boxes), 2, 3, 2 * groups)).astype(np.float32)
    with implementation(impl):
        got = roi.deform_roi_pool(features, boxes, bi, offsets, (2, 3), 0.5, ratio, aligned,
                                  gamma=0.3).numpy()
    want = ref_align_family(features, boxes, bi, 2, 3, 0.5, ratio, aligned, offsets=offsets,
                            gamma=0.3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("groups", [1, 2])
def test_deform_ps_roi_pool_matches_reference(impl, groups):
    features, boxes, bi = make_inputs(channels=2 * 4)
    rng = np.random.default_rng(2)
    offsets = rng.normal(size=(len(boxes), 2, 2, 2 * groups)).astype(np.float32)
    with implementation(impl):
        got = roi.deform_ps_roi_pool(features, boxes, bi, offsets, 2, 0.5).numpy()
    want = ref_align_family(features, boxes, bi, 2, 2, 0.5, 0, True, position_sensitive=True,
                            offsets=offsets, gamma=0.1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_deformable_pools_with_zero_offsets_equal_align(impl):
    features, boxes, bi = make_inputs(channels=8)
    zeros = np.zeros((len(boxes), 2, 2, 2), np.float32)
    with implementation(impl):
        a = roi.deform_roi_pool(features, boxes, bi, zeros, 2, 0.5, 2, False).numpy()
        b = roi.roi_align(features, boxes, bi, 2, 0.5, 2, False).numpy()
        c = roi.deform_ps_roi_pool(features, boxes, bi, zeros, 2, 0.5).numpy()
        d = roi.ps_roi_align(features, boxes, bi, 2, 0.5).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, d)


# ------------------------------------------------------------------------------------------------
# kernel == fallback, forward and backward, on a larger random problem
# ------------------------------------------------------------------------------------------------

def _random_problem(channels, rois=24, seed=3):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, 13, 17, channels)).astype(np.float32)
    xy = rng.uniform(-8, 60, size=(rois, 2))
    wh = rng.uniform(0, 40, size=(rois, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    bi = rng.integers(0, 2, size=rois).astype(np.int32)
    return features, boxes, bi


OPS = {
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


def _assert_kernel_equals_fallback(fn, features, boxes, bi, offsets, upstream, deformable):
    """Output, feature gradient and (deformable ops) offset gradient of kernel and fallback agree."""
    results = {}
    for impl in IMPLS:
        f, o = tf.constant(features), tf.constant(offsets)
        with implementation(impl), tf.GradientTape() as tape:
            tape.watch([f, o])
            out = fn(f, boxes, bi, o)
            loss = tf.reduce_sum(out * upstream)
        gf, go = tape.gradient(loss, [f, o])
        results[impl] = (out.numpy(), tf.convert_to_tensor(gf).numpy(),
                         None if go is None else tf.convert_to_tensor(go).numpy())
    (ko, kf, kg), (fo, ff, fg) = results["kernel"], results["fallback"]
    np.testing.assert_allclose(ko, fo, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kf, ff, atol=1e-4, rtol=1e-4)
    if deformable:
        np.testing.assert_allclose(kg, fg, atol=1e-3, rtol=1e-4)
        assert np.abs(kg).max() > 0


@pytest.mark.skipif(not KERNELS, reason="compiled kernels not built")
@pytest.mark.parametrize("name", sorted(OPS))
def test_kernel_equals_fallback_forward_and_backward(name):
    channels, fn = OPS[name]
    features, boxes, bi = _random_problem(channels)
    offsets = np.random.default_rng(4).normal(size=(len(boxes), 3, 2, 2)).astype(np.float32)
    out_channels = channels // 6 if name.startswith(("ps_", "deform_ps_")) else channels
    upstream = np.random.default_rng(5).normal(size=(len(boxes), 3, 2, out_channels)).astype(np.float32)
    _assert_kernel_equals_fallback(fn, features, boxes, bi, offsets, upstream, name.startswith("deform"))


@pytest.mark.skipif(not KERNELS, reason="compiled kernels not built")
@pytest.mark.parametrize("name", ["ps_roi_align", "deform_ps_roi_pool"])
def test_position_sensitive_kernels_equal_fallback_at_7x7_with_wide_groups(name):
    # Large enough for the CPU kernels to split bins and pixels over the worker threads, and with
    # more than 64 channels per offset group (the offset-gradient channel chunk).
    rng = np.random.default_rng(11)
    groups, cpg = 2, 70
    features = rng.normal(size=(2, 9, 11, 49 * groups * cpg)).astype(np.float32)
    xy = rng.uniform(-10, 150, size=(40, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 120, size=(40, 2))], 1).astype(np.float32)
    bi = rng.integers(0, 2, size=40).astype(np.int32)
    offsets = rng.normal(size=(40, 7, 7, 2 * groups)).astype(np.float32)
    upstream = rng.normal(size=(40, 7, 7, groups * cpg)).astype(np.float32)
    if name == "ps_roi_align":
        fn = lambda f, b, i, o: roi.ps_roi_align(f, b, i, 7, 1 / 16, 2)  # noqa: E731
    else:
        fn = lambda f, b, i, o: roi.deform_ps_roi_pool(f, b, i, o, 7, 1 / 16, 2, gamma=0.1)  # noqa: E731
    _assert_kernel_equals_fallback(fn, features, boxes, bi, offsets, upstream, name == "deform_ps_roi_pool")


# ------------------------------------------------------------------------------------------------
# gradient checks (numerical vs analytic) on small problems
# ------------------------------------------------------------------------------------------------

def _max_gradient_error(fn, args):
    theoretical, numerical = tf.test.compute_gradient(fn, args, delta=1e-2)
    return max(np.abs(t - n).max() for t, n in zip(theoretical, numerical))


def _traced(fn, *shapes):
    """fn as a tf.function with fixed shapes: compute_gradient calls it once per input element."""
    return tf.function(fn, input_signature=[tf.TensorSpec(s, tf.float32) for s in shapes])


GRAD_CASES = {
    "roi_pool": (3, lambda f: roi.roi_pool(f, BOXES, BI, 2, 0.5)),
    "ps_roi_pool": (8, lambda f: roi.ps_roi_pool(f, BOXES, BI, 2, 0.5)),
    "ps_roi_pool_torchvision": (8, lambda f: roi.ps_roi_pool(f, BOXES, BI, 2, 0.5,
                                                             bin_rule="torchvision")),
    "roi_align": (3, lambda f: roi.roi_align(f, BOXES, BI, 2, 0.5, 2, True)),
    "ps_roi_align": (8, lambda f: roi.ps_roi_align(f, BOXES, BI, 2, 0.5, 0)),
}
BOXES = np.array([[1.3, 2.2, 9.6, 8.1], [-2.0, 3.0, 6.4, 14.0]], np.float32)
BI = np.array([0, 1], np.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_feature_gradient_numerically(impl, name):
    channels, fn = GRAD_CASES[name]
    # Well-separated values: max pooling's arg-max must not flip under the finite difference.
    rng = np.random.default_rng(6)
    shape = (2, 5, 6, channels)
    values = rng.permutation(int(np.prod(shape))).astype(np.float32) * 0.1
    features = tf.constant(values.reshape(shape))
    with implementation(impl):
        assert _max_gradient_error(_traced(fn, shape), [features]) < 2e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ps", [False, True])
def test_deformable_gradients_numerically(impl, ps):
    rng = np.random.default_rng(7)
    channels = 4 if ps else 2
    features = tf.constant(rng.normal(size=(2, 5, 6, channels)).astype(np.float32))
    offsets = tf.constant(rng.normal(size=(2, 2, 2, 2)).astype(np.float32) * 0.5)
    if ps:
        def fn(f, o):
            return roi.deform_ps_roi_pool(f, BOXES, BI, o, 2, 0.5, 2, gamma=0.2)
    else:
        def fn(f, o):
            return roi.deform_roi_pool(f, BOXES, BI, o, 2, 0.5, 2, gamma=0.2)
    with implementation(impl):
        traced = _traced(fn, features.shape, offsets.shape)
        theoretical, numerical = tf.test.compute_gradient(traced, [features, offsets], delta=1e-3)
    # Features enter linearly: tight. Offsets move samples across pixel edges: looser.
    assert np.abs(theoretical[0] - numerical[0]).max() < 2e-3
    assert np.abs(theoretical[1] - numerical[1]).max() < 3e-2
    assert np.abs(theoretical[1]).max() > 1e-3


# ------------------------------------------------------------------------------------------------
# edge cases and bad input
# ------------------------------------------------------------------------------------------------

ALL_OPS = {
    "roi_pool": (8, lambda f, b, i: roi.roi_pool(f, b, i, 2)),
    "ps_roi_pool": (8, lambda f, b, i: roi.ps_roi_pool(f, b, i, 2)),
    "roi_align": (8, lambda f, b, i: roi.roi_align(f, b, i, 2)),
    "ps_roi_align": (8, lambda f, b, i: roi.ps_roi_align(f, b, i, 2)),
    "deform_roi_pool": (8, lambda f, b, i: roi.deform_roi_pool(
        f, b, i, tf.zeros([tf.shape(b)[0], 2, 2, 2]), 2)),
    "deform_ps_roi_pool": (8, lambda f, b, i: roi.deform_ps_roi_pool(
        f, b, i, tf.zeros([tf.shape(b)[0], 2, 2, 2]), 2)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_no_rois(impl, name):
    channels, fn = ALL_OPS[name]
    features = tf.random.normal([2, 5, 6, channels])
    boxes = tf.zeros([0, 4])
    bi = tf.zeros([0], tf.int32)
    with implementation(impl), tf.GradientTape() as tape:
        tape.watch(features)
        out = fn(features, boxes, bi)
    assert out.shape[0] == 0 and out.shape[1:3] == (2, 2)
    grad = tape.gradient(tf.reduce_sum(out), features)
    assert grad is None or not np.any(tf.convert_to_tensor(grad).numpy())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_batch_index_out_of_range_names_the_argument(impl, name):
    channels, fn = ALL_OPS[name]
    features = tf.random.normal([2, 5, 6, channels])
    boxes = tf.constant([[0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 4.0, 4.0]])
    for bad in ([0, 2], [-1, 0]):
        with implementation(impl), pytest.raises(tf.errors.InvalidArgumentError,
                                                 match="box_indices"):
            fn(features, boxes, tf.constant(bad, tf.int32))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(ALL_OPS))
def test_non_finite_boxes_are_rejected(impl, name):
    channels, fn = ALL_OPS[name]
    features = tf.random.normal([1, 5, 6, channels])
    boxes = tf.constant([[0.0, np.nan, 3.0, 3.0]])
    with implementation(impl), pytest.raises(tf.errors.InvalidArgumentError, match="boxes"):
        fn(features, boxes, tf.constant([0]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", [roi.ps_roi_pool, roi.ps_roi_align])
def test_channels_not_divisible_by_bins(impl, op):
    features = tf.random.normal([1, 5, 6, 10])
    boxes = tf.constant([[0.0, 0.0, 3.0, 3.0]])
    with implementation(impl):
        with pytest.raises(ValueError, match="divisible"):
            op(features, boxes, [0], 2)  # known at trace time: Python error

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.float32)])
        def dynamic(f):
            return op(f, boxes, [0], 2)

        with pytest.raises(tf.errors.InvalidArgumentError, match="divisible"):
            dynamic(features)


def test_bad_arguments_name_themselves():
    features = tf.random.normal([1, 5, 6, 4])
    boxes = tf.constant([[0.0, 0.0, 3.0, 3.0]])
    with pytest.raises(TypeError, match="box_indices"):
        roi.roi_align(features, boxes, tf.constant([0.0]), 2)
    with pytest.raises(TypeError, match="features"):
        roi.roi_align(tf.zeros([1, 5, 6, 4], tf.int32), boxes, [0], 2)
    with pytest.raises(TypeError, match="boxes"):
        roi.roi_pool(features, tf.constant([[0, 0, 3, 3]]), [0], 2)
    with pytest.raises(ValueError, match="features"):
        roi.roi_align(tf.zeros([5, 6, 4]), boxes, [0], 2)
    with pytest.raises(ValueError, match="boxes"):
        roi.roi_align(features, tf.zeros([1, 5]), [0], 2)
    with pytest.raises(ValueError, match="output_size"):
        roi.roi_align(features, boxes, [0], (0, 2))
    with pytest.raises(ValueError, match="offsets"):
        roi.deform_roi_pool(features, boxes, [0], tf.zeros([1, 3, 2, 2]), 2)
    with pytest.raises(ValueError, match="offsets"):
        roi.deform_roi_pool(features, boxes, [0], tf.zeros([1, 2, 2, 6]), 2)  # 3 groups, 4 ch


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_are_accepted(impl, dtype):
    features, boxes, bi = make_inputs()
    with implementation(impl):
        want = roi.roi_align(features, boxes, bi, 2, 0.5).numpy()
        got = roi.roi_align(tf.cast(features, dtype), boxes, bi, 2, 0.5)
        assert got.dtype == tf.as_dtype(dtype)
        offs = tf.zeros([len(boxes), 2, 2, 2], dtype)
        got_d = roi.deform_roi_pool(tf.cast(features, dtype), boxes, bi, offs, 2, 0.5)
    np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), want, atol=0.05, rtol=0.02)
    np.testing.assert_allclose(tf.cast(got_d, tf.float32).numpy(), want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("impl", IMPLS)
def test_inside_tf_function_with_dynamic_shapes(impl):
    features, boxes, bi = make_inputs(channels=8)
    spec = [tf.TensorSpec([None, None, None, 8]), tf.TensorSpec([None, 4]),
            tf.TensorSpec([None], tf.int32)]

    with implementation(impl):
        @tf.function(input_signature=spec)
        def pooled(f, b, i):
            offsets = tf.zeros([tf.shape(b)[0], 2, 2, 2])
            return (roi.roi_pool(f, b, i, 2, 0.5), roi.roi_align(f, b, i, 2, 0.5),
                    roi.ps_roi_pool(f, b, i, 2, 0.5), roi.ps_roi_align(f, b, i, 2, 0.5),
                    roi.deform_roi_pool(f, b, i, offsets, 2, 0.5),
                    roi.deform_ps_roi_pool(f, b, i, offsets, 2, 0.5))

        outs = pooled(features, boxes, bi)
    np.testing.assert_allclose(outs[0].numpy(), ref_roi_pool(features, boxes, bi, 2, 2, 0.5),
                               atol=1e-5)
    np.testing.assert_allclose(outs[1].numpy(),
                               ref_align_family(features, boxes, bi, 2, 2, 0.5, 0, True),
                               atol=1e-5)
    assert [o.shape[-1] for o in outs] == [8, 8, 2, 2, 8, 2]


def _boundary_problem():
    """RoIs whose sides are multiples of 7 feature pixels at stride 8, 7x7 bins."""
    rng = np.random.default_rng(0)
    features = tf.constant(rng.normal(size=(2, 16, 16, 196)).astype(np.float32))
    starts = rng.integers(0, 40, (64, 2)).astype(np.float32)
    sides = rng.integers(1, 9, (64, 2)).astype(np.float32) * 7.0 - 1.0
    boxes = tf.constant(np.concatenate([starts, starts + sides], 1))
    indices = tf.constant(rng.integers(0, 2, 64).astype(np.int32))
    return features, boxes, indices


def _ps_roi_pool_torchvision(*args, **kwargs):
    return roi.ps_roi_pool(*args, bin_rule="torchvision", **kwargs)


BOUNDARY_OPS = {"ps_roi_pool": roi.ps_roi_pool, "ps_roi_pool_torchvision": _ps_roi_pool_torchvision,
                "roi_pool": roi.roi_pool, "roi_align": roi.roi_align,
                "ps_roi_align": roi.ps_roi_align}


@pytest.mark.parametrize("op", sorted(BOUNDARY_OPS))
def test_fallback_in_a_graph_equals_the_eager_fallback_at_exact_bin_boundaries(op):
    # Inside tf.function TensorFlow rewrites x / 7 as x * (1 / 7), one ulp off: 10 * (1 / 7) * 7
    # ceils to 11 instead of 10, and 14 / 7 ceils to 3 samples instead of 2. RoI sizes that are
    # multiples of the bin count hit exactly those cases.
    features, boxes, indices = _boundary_problem()
    fn = BOUNDARY_OPS[op]
    with _kernels.pure_tf():
        eager = fn(features, boxes, indices, 7, spatial_scale=1 / 8).numpy()
        graph = tf.function(lambda f, b, i: fn(f, b, i, 7, spatial_scale=1 / 8))(
            features, boxes, indices).numpy()
    np.testing.assert_allclose(graph, eager, atol=1e-5)


@pytest.mark.skipif(not KERNELS, reason="compiled kernels not built")
@pytest.mark.parametrize("rule", ["rfcn", "torchvision"])
@pytest.mark.parametrize("scale", [1 / 8, 1 / 16, 0.3])
def test_ps_roi_pool_kernel_equals_fallback_and_reference_at_exact_bin_boundaries(rule, scale):
    # Bin edges start + k * size that land on (or one rounding away from) an integer: kernel,
    # graph fallback and the step-by-step float32 reference must take the same pixel.
    features, boxes, indices = _boundary_problem()
    features = features[..., :98]
    want = ref_roi_pool(features.numpy(), boxes.numpy(), indices.numpy(), 7, 7, scale,
                        position_sensitive=True, rule=rule)
    for impl in IMPLS:
        with implementation(impl):
            got = tf.function(lambda f, b, i: roi.ps_roi_pool(f, b, i, 7, scale, bin_rule=rule))(
                features, boxes, indices).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)
