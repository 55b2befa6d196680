"""Mixed precision (issue 12): the kernels and their fallbacks take float16 / bfloat16 inputs and
compute in float32 inside; boxes stay float32 through the layers and the model call; a tiny
detector of each family trains under "mixed_float16" (with loss scaling) and "mixed_bfloat16",
and predicts float32 boxes and scores.

Every test that sets a global dtype policy restores "float32" (the `policy` fixture), so the other
test files never see it.
"""
import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.pipeline import build_dataset
from kerasdet.data.synthetic import make_dataset
from kerasdet.heads.roi_extractor import RoIExtractor
from kerasdet.layers.roi_layers import PSRoIAlign, RoIAlign
from kerasdet.models.base import batch_image_shapes, ground_truth
from kerasdet.models.cascade_rcnn import CascadeRCNN
from kerasdet.models.ccnet import CCNet
from kerasdet.models.deformable import DeformableFasterRCNN, deformable_rfcn
from kerasdet.models.fast_rcnn import FastRCNN, jittered_proposals
from kerasdet.models.mask_rcnn import MaskRCNN
from kerasdet.models.overfeat import OverFeatDetector
from kerasdet.models.rcnn import RCNN
from kerasdet.models.rfcn import RFCN
from kerasdet.ops import _kernels, deform_conv2d, roi

HALF = ["float16", "bfloat16"]
POLICIES = ["mixed_float16", "mixed_bfloat16"]
IMPLS = ["kernel", "fallback"]


@contextlib.contextmanager
def implementation(name):
    if name == "kernel":
        if not _kernels.use_kernels():
            pytest.skip("compiled kernels not built")
        yield
    else:
        with _kernels.pure_tf():
            yield


@pytest.fixture
def policy():
    """set(name) sets the global dtype policy; the test leaves with "float32" whatever happens."""
    try:
        yield keras.config.set_dtype_policy
    finally:
        keras.config.set_dtype_policy("float32")


def eps(dtype):
    """Spacing of the half type's numbers in [1, 2): float16 2^-10, bfloat16 2^-7."""
    return {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}[tf.as_dtype(dtype).name]


# -- ops: half inputs, float32 inside, half out -------------------------------------------------
# Boxes of every kind the RoI kernels handle (inside, partly outside, empty, the whole map) on a
# stride-2 map (spatial_scale 0.5).
FEATURES_SHAPE = (2, 9, 11, 8)
BOXES = np.array([[2.2, 3.1, 15.7, 12.4], [-6.0, -4.0, 8.0, 6.0], [14.0, 10.0, 30.0, 40.0],
                  [8.0, 8.0, 8.0, 8.0], [0.0, 0.0, 22.0, 18.0]], np.float32)
BOX_INDICES = np.array([0, 1, 0, 1, 0], np.int32)


def _offsets(rng, groups=1):
    # Small normalized bin offsets (gamma 0.1 of the RoI size moves the bins by < 1 pixel).
    return rng.uniform(-0.5, 0.5, (len(BOXES), 2, 2, 2 * groups)).astype(np.float32)


OPS = {
    "roi_pool": (lambda f, o: roi.roi_pool(f, BOXES, BOX_INDICES, 2, 0.5), False),
    "roi_align": (lambda f, o: roi.roi_align(f, BOXES, BOX_INDICES, 2, 0.5), False),
    "ps_roi_pool": (lambda f, o: roi.ps_roi_pool(f, BOXES, BOX_INDICES, 2, 0.5), False),
    "ps_roi_align": (lambda f, o: roi.ps_roi_align(f, BOXES, BOX_INDICES, 2, 0.5), False),
    "deform_roi_pool": (lambda f, o: roi.deform_roi_pool(f, BOXES, BOX_INDICES, o, 2, 0.5), True),
    "deform_ps_roi_pool": (lambda f, o: roi.deform_ps_roi_pool(f, BOXES, BOX_INDICES, o, 2, 0.5),
                           True),
}


def _run(fn, inputs, upstream):
    """(output, gradients of sum(output * upstream) w.r.t. every input)."""
    with tf.GradientTape() as tape:
        for x in inputs:
            tape.watch(x)
        out = fn(*inputs)
        total = tf.reduce_sum(out * tf.cast(upstream, out.dtype))
    return out, tape.gradient(total, inputs)


def _check_half_against_float32(fn, arrays, dtype, impl, input_tolerance):
    """The half-precision call returns `dtype`, equals the float32 computation on the same
    (rounded) inputs rounded once at the end (within one unit of the half type), matches the
    float32 result on the unrounded inputs within `input_tolerance` * eps * max |output|, and its
    gradients are finite, of `dtype`, and the float32 gradients rounded once."""
    rng = np.random.default_rng(1)
    half = [tf.constant(a, dtype) for a in arrays]
    rounded = [tf.cast(h, tf.float32) for h in half]
    e = eps(dtype)
    with implementation(impl):
        reference = fn(*[tf.constant(a) for a in arrays])
        upstream = tf.cast(tf.constant(rng.normal(size=reference.shape), dtype), tf.float32)
        got, got_grads = _run(fn, half, upstream)
        want, want_grads = _run(fn, rounded, upstream)
    assert got.dtype == tf.as_dtype(dtype)
    got32 = tf.cast(got, tf.float32).numpy()
    scale = max(np.abs(want.numpy()).max(), 1e-3)
    np.testing.assert_allclose(got32, want.numpy(), rtol=e, atol=e * scale)
    reference_scale = max(np.abs(reference.numpy()).max(), 1e-3)
    np.testing.assert_allclose(got32, reference.numpy(), rtol=0,
                               atol=input_tolerance * e * reference_scale)
    for g, w in zip(got_grads, want_grads):
        assert g is not None and g.dtype == tf.as_dtype(dtype)
        g32 = tf.cast(g, tf.float32).numpy()
        assert np.all(np.isfinite(g32))
        w = w.numpy()
        assert np.abs(w).max() > 0  # the comparison below is not vacuous
        np.testing.assert_allclose(g32, w, rtol=e, atol=e * np.abs(w).max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("op", sorted(OPS))
def test_roi_ops_take_half_inputs_and_compute_in_float32(op, dtype, impl):
    fn, deformable = OPS[op]
    rng = np.random.default_rng(0)
    features = rng.normal(size=FEATURES_SHAPE).astype(np.float32)
    if deformable:
        arrays = [features, _offsets(rng)]
        call = fn
    else:
        arrays = [features]
        call = lambda f: fn(f, None)  # noqa: E731
    # Rounding the features to the half type moves each by <= eps / 2 of its size; a pooled value
    # is an average or maximum of them, the deformable ones also move with the rounded offsets.
    _check_half_against_float32(call, arrays, dtype, impl, input_tolerance=2.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", HALF)
def test_deform_conv_takes_half_inputs_and_computes_in_float32(dtype, impl):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 7, 4)).astype(np.float32)
    offsets = rng.uniform(-2, 2, size=(2, 6, 7, 18)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 3)).astype(np.float32)
    mask = rng.uniform(0, 1, size=(2, 6, 7, 9)).astype(np.float32)

    def call(x, offsets, kernel, mask):
        return deform_conv2d(x, offsets, kernel, mask=mask, padding=1)

    # A sum of 36 products of rounded numbers, and sample points moved by the rounded offsets
    # (bfloat16 rounds an offset of 2 by up to 2^-7).
    _check_half_against_float32(call, [x, offsets, kernel, mask], dtype, impl,
                                input_tolerance=16.0)


# -- boxes stay float32 through the layers and the model call -------------------------------------
def _ramp_features(width=400, offset=300):
    """A map whose value is x - offset for x >= offset: pooling it reads a box's x position with
    the resolution of the feature values (fine near 0), not of the coordinates (coarse at 300)."""
    ramp = np.clip(np.arange(width, dtype=np.float32) - offset, 0, None)
    return np.tile(ramp[None, None, :, None], [1, 8, 1, 4])


@pytest.mark.parametrize("name", POLICIES)
def test_roi_layers_and_extractor_keep_float32_boxes_under_a_mixed_policy(name, policy):
    # Measured without kerasdet.layers.roi_layers.keep_input_dtypes: Keras casts the boxes to the
    # compute dtype, and the RoI whose (half-pixel shifted) centre reads 1.3 read 1.5 under
    # bfloat16 and 1.25 under float16.
    features = _ramp_features()
    boxes = np.array([[301.3, 1.0, 302.3, 3.0]], np.float32)
    with implementation("fallback"):
        reference = float(roi.roi_align(features, boxes, [0], 1, 1.0, sampling_ratio=1)[0, 0, 0, 0])
    policy(name)
    layer = RoIAlign(1, 1.0, sampling_ratio=1)
    extractor = RoIExtractor(1, strides=(1,), method="roi_align", sampling_ratio=1)
    position_sensitive = PSRoIAlign(1, 1.0, sampling_ratio=1)
    compute = tf.as_dtype(name.split("_")[1])
    outputs = [layer(features, boxes, np.zeros([1], np.int32)), extractor(features, boxes[None]),
               position_sensitive(features, boxes[None])]
    for out in outputs:
        assert out.dtype == compute  # the features are pooled in the compute dtype
        value = float(tf.reshape(tf.cast(out, tf.float32), [-1])[0])
        # Only the output's own rounding remains: 1.8 to within half a unit of the half type.
        assert abs(value - reference) <= eps(compute) * abs(reference), (value, reference)


def test_model_call_keeps_float32_image_info_and_proposals_under_bfloat16(policy):
    # Keras casts a model's floating inputs to the compute dtype unless told not to: bfloat16 turned
    # an image width of 1333 into 1336 and a proposal corner at 301.3 into 302 (measured).
    seen = []

    class Recording(FastRCNN):
        def detect(self, images, image_shapes, training=False, inputs=None):
            seen.append((image_shapes, inputs["proposals"]))
            return super().detect(images, image_shapes, training, inputs)

    policy("mixed_bfloat16")
    model = Recording(3, backbone="tiny", feature="C4", fc_dim=32, seed=0)
    proposals = np.array([[[301.3, 2.1, 333.7, 40.9], [0.0, 0.0, 40.0, 40.0]]], np.float32)
    info = np.array([[1333.0, 1333.0, 1.0, 1.0, 1333.0, 1333.0]], np.float32)
    out = model({"images": np.zeros([1, 64, 64, 3], np.float32), "image_info": info,
                 "proposals": proposals})
    shapes, seen_proposals = seen[-1]
    assert shapes.dtype == tf.float32 and seen_proposals.dtype == tf.float32
    np.testing.assert_array_equal(shapes.numpy(), [[1333.0, 1333.0]])
    np.testing.assert_array_equal(seen_proposals.numpy(), proposals)
    assert out["boxes"].dtype == tf.float32 and out["scores"].dtype == tf.float32


# -- every family trains and predicts under both policies -----------------------------------------
def _small_fpn(**extra):
    settings = dict(backbone="tiny", fpn_channels=16, fc_dim=32,
                    anchor_sizes=((16,), (32,), (64,), (128,), (256,)), rpn_batch_size=32,
                    roi_batch_size=16, rpn_pre_nms_top_k_train=100, rpn_post_nms_top_k_train=32,
                    rpn_pre_nms_top_k_test=100, rpn_post_nms_top_k_test=32, seed=0)
    settings.update(extra)
    return settings


def _small_rfcn(**extra):
    settings = dict(backbone="tiny_dcn",
                    backbone_config=dict(deformable_stages=(), output_stride=8,
                                         channels=(8, 16, 16, 32, 32)),
                    anchor_strides=(8,), anchor_sizes=((16, 32, 64),), pool_size=3,
                    ps_pooling="ps_roi_align", head_channels=16, rpn_batch_size=32,
                    roi_batch_size=16, rpn_pre_nms_top_k_train=100, rpn_post_nms_top_k_train=32,
                    rpn_pre_nms_top_k_test=100, rpn_post_nms_top_k_test=32, seed=0)
    settings.update(extra)
    return settings


# Mask R-CNN is Faster R-CNN FPN plus the mask branch (the same features, RPN and box stage), so it
# stands for both: one model build and trace less in a file kept to about three minutes.
FAMILIES = {
    # CC-Net on single maps (the RPN on C4, stages pooling C4 and C3) also stands for Faster R-CNN
    # C4 (the single-map RPN and a 2fc head per stage), which had its own case before.
    "ccnet": lambda: CCNet(3, **_small_fpn(fpn=False, anchor_sizes=((16, 32, 64),),
                                           stage_features=("C4", "C4", "C3", "C3"))),
    "mask_rcnn": lambda: MaskRCNN(3, **_small_fpn(mask_channels=8, mask_num_convs=1,
                                                  mask_pool_size=7, mask_rois_per_image=4)),
    "cascade_rcnn": lambda: CascadeRCNN(3, **_small_fpn()),
    "rfcn": lambda: RFCN(3, **_small_rfcn()),
    "deformable_faster_rcnn": lambda: DeformableFasterRCNN(
        3, **_small_fpn(backbone="tiny_dcn", backbone_config=dict(deformable_stages=(5,)))),
    "deformable_rfcn": lambda: deformable_rfcn(
        3, **_small_rfcn(backbone_config=dict(output_stride=8, channels=(8, 16, 16, 32, 32)),
                         ps_pooling="deform_ps_roi_pool")),
    # No proposals, no RoI ops: offset pooling, the dense classifier and the greedy merge loop.
    "overfeat": lambda: OverFeatDetector(3, variant="tiny", classifier_dims=(32, 32),
                                         regressor_dims=(32, 16), dropout=0.0, seed=0),
    # Warped regions through a per-region network, the SVM / ridge variables kept float32.
    "rcnn": lambda: RCNN(3, backbone="alexnet_tiny", roi_batch_size=16, crop_batch=32, seed=0),
    "fast_rcnn": lambda: FastRCNN(3, backbone="tiny", feature="C4", fc_dim=32, roi_batch_size=16,
                                  seed=0),
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Four 64 x 64 images of the synthetic shapes (with instance masks)."""
    return make_dataset(str(tmp_path_factory.mktemp("precision")), 4, seed=3,
                        image_size=(64, 64), object_size=(12, 40))


def _add_proposals(batch):
    gt_boxes, gt_labels = ground_truth(batch)
    shapes = batch_image_shapes(batch, batch["images"])
    return dict(batch, proposals=jittered_proposals(gt_boxes, gt_labels, shapes, 32, seed=5))


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_detector_trains_and_predicts_under_mixed_precision(family, name, tiny_data, policy):
    policy(name)
    model = FAMILIES[family]()
    compute = tf.as_dtype(name.split("_")[1])
    assert model.compute_dtype == compute.name and model.variable_dtype == "float32"
    dataset = build_dataset(tiny_data, 2, training=True, image_size=(64, 64), seed=0,
                            with_masks=isinstance(model, MaskRCNN), mask_size=28, prefetch=False)
    if "proposals" in model.predict_input_keys:
        dataset = dataset.map(_add_proposals)
    model.build()
    before = [v.numpy().copy() for v in model.trainable_variables]
    # Plain graphs: XLA compilation has tests of its own.
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9, clipnorm=10.0),
                  jit_compile=False)
    # Keras wraps the optimizer for float16 only (bfloat16 has float32's exponent range).
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (name == "mixed_float16")
    history = model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0).history
    assert history["loss"] and all(np.isfinite(v).all() for v in history.values()), history
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    # The steps were applied: a loss-scaled step whose gradients overflow is skipped, so an
    # optimizer that skipped every step would leave the weights as they were.
    assert any(not np.array_equal(b, a) for b, a in zip(before, after))
    if scaled:
        assert np.isfinite(float(model.optimizer.dynamic_scale.numpy()))

    batch = next(iter(dataset))
    if hasattr(getattr(model, "proposal_source", None), "outputs"):  # an RPN: its outputs leave the head float32
        maps, _ = model.features(model.input_images(batch))
        logits, deltas, _ = model.proposal_source.outputs(maps)
        assert maps[0].dtype == compute
        assert all(x.dtype == tf.float32 for x in logits + deltas)
    inputs = {key: batch[key] for key in model.predict_input_keys}
    out = model.predict_on_batch(inputs)
    assert out["boxes"].dtype == np.float32 and out["scores"].dtype == np.float32
    assert out["classes"].dtype == np.int32
    assert np.isfinite(out["boxes"]).all() and np.isfinite(out["scores"]).all()
    if "masks" in out:
        assert out["masks"].dtype in (np.uint8, np.float32)


def test_run_drivers_check_the_precision_and_restore_the_policy():
    from kerasdet.engine import runs

    assert runs.checked_precision(None, "x") == "float32"
    with pytest.raises(ValueError, match=r"kerasdet evaluate: unknown precision 'float8'.*mixed_bfloat16"):
        runs.checked_precision("float8", "kerasdet evaluate")
    before = keras.config.dtype_policy().name
    with runs.dtype_policy("mixed_bfloat16", "kerasdet predict") as precision:
        assert precision == "mixed_bfloat16" and keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == before
    with pytest.raises(ValueError, match="kerasdet predict"):
        with runs.dtype_policy("half", "kerasdet predict"):
            pass
    assert keras.config.dtype_policy().name == before
