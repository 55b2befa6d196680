"""XLA: what compiles gives the numbers of the non-XLA path, what cannot compile says so, and the
default jit_compile="auto" never hands the compiled kernels to XLA.

The detector test traces a tiny Faster R-CNN under XLA (about a minute of XLA compilation on CPU);
the speed with and without XLA is measured by benchmarks/xla_speed.py, not here.
"""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import ops
from kerasdet.layers import DeformConv2D, RoIAlign, RoIPool
from kerasdet.models import FasterRCNN
from kerasdet.necks import upsample_nearest_to
from kerasdet.ops import _kernels
from kerasdet.ops.xla import XLAUnsupportedError, in_xla_context

from learning import tiny_fpn_settings


def both(fn, *args):
    """fn(*args) traced without and with XLA, as numpy."""
    plain = tf.function(fn)(*args)
    compiled = tf.function(fn, jit_compile=True)(*args)
    return tf.nest.map_structure(np.asarray, plain), tf.nest.map_structure(np.asarray, compiled)


def assert_same(plain, compiled, exact=True):
    for a, b in zip(tf.nest.flatten(plain), tf.nest.flatten(compiled)):
        if exact or a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_in_xla_context_only_while_tracing_for_xla():
    seen = []

    def probe(x):
        seen.append(in_xla_context())
        return x + 1.0

    tf.function(probe)(tf.constant(1.0))
    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    assert seen == [False, True] and not in_xla_context()


# -- ops: the XLA path gives the non-XLA numbers -------------------------------------------------
def _labels(rng, shape):
    return rng.choice(np.array([1, 0, 0, 0, -1], np.int32), size=shape)


def test_sampling_under_xla_matches():
    rng = np.random.default_rng(0)
    labels = _labels(rng, (3, 200))
    labels[2] = -1  # an image with nothing to sample
    losses = rng.uniform(size=(3, 200)).astype(np.float32)

    def fn(labels, losses):
        indices, valid = ops.sample_balanced_indices(labels, 64, 0.25, seed=5)
        return (indices, valid, ops.sample_balanced(labels, 64, 0.25, seed=5),
                ops.hard_negative_mining(losses, labels, 3.0, 2))

    plain, compiled = both(fn, labels, losses)
    # XLA draws other random numbers from the same seed, so the samples differ; their sizes, the
    # mask form and the hard negatives (no randomness) do not.
    np.testing.assert_array_equal(compiled[3], plain[3])
    np.testing.assert_array_equal(compiled[1].sum(1), plain[1].sum(1))
    for indices, valid, mask, _ in (plain, compiled):
        # The mask form marks exactly the valid sampled indices (it has no boolean_mask any more).
        expected = np.zeros_like(mask)
        for b in range(3):
            expected[b, indices[b][valid[b]]] = True
        np.testing.assert_array_equal(mask, expected)
        assert mask[0].sum() == 64 and not mask[2].any()
        assert (labels[mask] >= 0).all()


def test_matching_and_anchors_under_xla_match():
    rng = np.random.default_rng(1)
    generator = ops.AnchorGenerator(strides=(8, 16), sizes=[(16, 24), (48,)])
    gt_xy = rng.uniform(0, 40, (2, 5, 2))
    gt_boxes = np.concatenate([gt_xy, gt_xy + rng.uniform(8, 30, (2, 5, 2))], -1).astype(np.float32)
    gt_labels = np.array([[0, 2, 1, -1, -1], [1, 0, -1, -1, -1]], np.int32)
    crowd = np.array([[False, False, True, False, False], [False] * 5])
    shapes = np.array([[64, 64], [48, 56]], np.float32)

    def fn(gt_boxes, gt_labels, crowd, shapes):
        anchors = generator.for_image((64, 64))
        inside = ops.anchors_inside_image_mask(anchors, shapes)
        rpn = ops.label_boxes(anchors[tf.newaxis], gt_boxes, gt_labels, 0.7, 0.3,
                              allow_low_quality_matches=True, box_valid=inside, gt_crowd=crowd)
        roi = ops.label_boxes(gt_boxes + 2.0, gt_boxes, gt_labels, 0.5, 0.5, 0.1)
        return anchors, inside, tuple(rpn), tuple(roi), ops.gather_by_match(gt_boxes, rpn.matched_index)

    plain, compiled = both(fn, gt_boxes, gt_labels, crowd, shapes)
    assert_same(plain, compiled, exact=False)
    assert (plain[2][1] == 1).any() and (plain[2][1] == -1).any()  # positives and ignored anchors


@pytest.mark.parametrize("source,target", [((4, 5), (8, 10)), ((4, 5), (7, 9)), ((3, 3), (7, 8)),
                                           ((1, 1), (2, 3))])
def test_fpn_upsampling_under_xla_matches_values_and_gradients(source, target):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(2,) + source + (3,)).astype(np.float32))
    reference = tf.zeros((2,) + target + (1,))
    weights = tf.constant(rng.normal(size=(2,) + target + (3,)).astype(np.float32))

    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = upsample_nearest_to(x, reference)
            loss = tf.reduce_sum(y * weights)
        return y, tape.gradient(loss, x)

    plain, compiled = both(fn, x)
    assert_same(plain, compiled, exact=False)


def test_multiclass_nms_cap_that_cannot_bind_compiles_with_the_same_detections():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 80, (2, 60, 1, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (2, 60, 1, 2))], -1)
    boxes = np.tile(boxes, [1, 1, 3, 1]).astype(np.float32) + rng.normal(0, 2, (2, 60, 3, 4)).astype(
        np.float32)
    scores = rng.uniform(size=(2, 60, 3)).astype(np.float32)

    def fn(boxes, scores):
        return ops.multiclass_nms(boxes, scores, 20, iou_threshold=0.5, score_threshold=0.3,
                                  max_per_class=20)

    plain, compiled = both(fn, boxes, scores)
    assert_same(plain, compiled, exact=False)
    assert plain["num_detections"].min() > 0


def test_deformable_convolution_pure_tf_compiles_with_the_same_values_and_gradients():
    layer = DeformConv2D(4, 3, use_mask=True)
    x = tf.random.uniform([2, 9, 11, 3])
    layer(x)
    for variable in layer.weights:  # non-zero offsets, so the bilinear sampling is exercised
        if "offset" in variable.path:
            variable.assign(tf.random.normal(variable.shape, stddev=0.3))

    def fn(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    with _kernels.pure_tf():
        plain, compiled = both(fn, x)
    for a, b in zip(tf.nest.flatten(plain), tf.nest.flatten(compiled)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


# -- what XLA cannot compile says so ---------------------------------------------------------------
def _raises_under_xla(fn, *args):
    with _kernels.pure_tf(), pytest.raises(XLAUnsupportedError, match="jit_compile=False") as error:
        tf.function(fn, jit_compile=True, autograph=False)(*args)
    return str(error.value)


def test_ops_without_a_fixed_shape_form_name_themselves_under_xla():
    features = tf.random.uniform([1, 16, 16, 4])
    boxes = tf.constant([[1.0, 2.0, 9.0, 12.0]])
    indices = tf.constant([0])
    message = _raises_under_xla(lambda f: ops.roi_align(f, boxes, indices, 2, 1.0, 0), features)
    assert "roi_align" in message and "sampling_ratio" in message
    assert "roi_pool" in _raises_under_xla(lambda f: ops.roi_pool(f, boxes, indices, 2), features)
    message = _raises_under_xla(lambda s: ops.multiclass_nms(tf.zeros([1, 4, 2, 4]), s, 10,
                                                             max_per_class=3), tf.zeros([1, 4, 2]))
    assert "combined_non_max_suppression" in message


def test_kernel_layers_support_xla_only_on_their_pure_tf_paths():
    layers = {"align2": RoIAlign(2, sampling_ratio=2), "align0": RoIAlign(2, sampling_ratio=0),
              "pool": RoIPool(2), "deform": DeformConv2D(4, 3)}
    with _kernels.pure_tf():
        assert {k: v.supports_jit for k, v in layers.items()} == {
            "align2": True, "align0": False, "pool": False, "deform": True}
    if _kernels.use_kernels():  # the compiled kernels are loaded: nothing may go to XLA
        assert not any(layer.supports_jit for layer in layers.values())


def test_jit_compile_true_names_the_layers_xla_cannot_compile():
    model = FasterRCNN(3, **tiny_fpn_settings())  # RoIAlign with the adaptive sampling_ratio=0
    with pytest.raises(XLAUnsupportedError, match=r"RoIAlign 'roi_align_0'.*jit_compile=False"):
        model.compile(optimizer="sgd", jit_compile=True)


# -- the default: "auto" --------------------------------------------------------------------------
def _pretend_gpu(monkeypatch):
    _kernels.library()  # load (or fail to load) the CPU library before TensorFlow "sees" a GPU
    real = tf.config.list_physical_devices
    fake = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: real(kind) + ([fake] if kind in (None, "GPU") else []))


def test_auto_is_off_while_the_kernels_are_in_use(monkeypatch, caplog):
    if not _kernels.use_kernels():
        pytest.skip(f"the compiled kernels are not loaded here: {_kernels.status()['reason']}")
    _pretend_gpu(monkeypatch)
    model = FasterRCNN(3, roi_sampling_ratio=2, **tiny_fpn_settings())
    with caplog.at_level("INFO", logger="kerasdet"):
        model.compile(optimizer="sgd")
    assert model.jit_compile is False
    assert "jit_compile='auto' -> False" in caplog.text and "kernels" in caplog.text
    # Keras' own rule reads the layers too: a plain Keras model around RoIAlign stays off.
    assert model._resolve_auto_jit_compile() is False


def test_auto_follows_keras_on_a_gpu_without_the_kernels(monkeypatch):
    _pretend_gpu(monkeypatch)
    monkeypatch.setenv("KERASDET_PURE_TF", "1")
    model = FasterRCNN(3, roi_sampling_ratio=2, **tiny_fpn_settings())
    model.compile(optimizer="sgd")
    assert model.jit_compile is True
    adaptive = FasterRCNN(3, **tiny_fpn_settings())
    adaptive.compile(optimizer="sgd")
    assert adaptive.jit_compile is False  # RoIAlign with sampling_ratio=0 cannot compile
    model.compile(optimizer="sgd", jit_compile=False)
    assert model.jit_compile is False and "train_step" not in model.__dict__


# -- a detector trains and predicts under XLA ---------------------------------------------------------
def _batch(batch_size=2, size=96):
    rng = np.random.default_rng(4)
    boxes = np.array([[10, 12, 50, 60], [40, 30, 90, 80], [0, 0, 0, 0]], np.float32)
    return {"images": rng.uniform(0, 255, [batch_size, size, size, 3]).astype(np.float32),
            "bounding_boxes": {"boxes": np.tile(boxes, [batch_size, 1, 1]),
                               "labels": np.tile(np.array([[0, 2, -1]], np.int32), [batch_size, 1])},
            "image_info": np.tile(np.array([[size, size, 1, 1, size, size]], np.float32),
                                  [batch_size, 1])}


def test_faster_rcnn_fits_and_predicts_under_xla():
    batch = _batch()
    inputs = {"images": batch["images"], "image_info": batch["image_info"]}
    model = FasterRCNN(3, roi_sampling_ratio=2, **tiny_fpn_settings())
    model.compile(optimizer="sgd", jit_compile=False)
    before = model.predict_on_batch(inputs)

    model.compile(optimizer="sgd", jit_compile=True)
    assert model.jit_compile is True
    compiled = model.predict_on_batch(inputs)
    np.testing.assert_array_equal(compiled["num_detections"], before["num_detections"])
    assert compiled["num_detections"].min() > 0
    # Same detections up to float rounding (XLA fuses differently); the order of near-equal
    # scores may differ, so the sorted scores are compared.
    np.testing.assert_allclose(np.sort(compiled["scores"], 1), np.sort(before["scores"], 1),
                               rtol=1e-4, atol=1e-5)

    data = tf.data.Dataset.from_tensors(batch).repeat(3)
    history = model.fit(data, epochs=1, verbose=0)
    for name, values in history.history.items():
        assert len(values) == 1 and np.isfinite(values[0]), name
    assert history.history["loss"][0] > 0
    weights_moved = model.predict_on_batch(inputs)["scores"]
    assert not np.allclose(weights_moved, compiled["scores"])
