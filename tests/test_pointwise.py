"""kerasdet.ops.pointwise_conv2d (1x1 convolution, gradients as matrix products) and
kerasdet.layers.PointwiseConv2D (the 1x1 Conv2D of ResNet and FPN that uses it in training)."""
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers import PointwiseConv2D
from kerasdet.ops import pointwise_conv2d


def _problem(seed=0, shape=(2, 5, 7, 6), filters=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(1, 1, shape[-1], filters)).astype(np.float32)
    dy = rng.normal(size=shape[:-1] + (filters,)).astype(np.float32)
    return x, w, dy


def _gradients(fn, x, w, dy):
    x, w, dy = (tf.constant(v) for v in (x, w, dy))
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = fn(x, w)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.cast(dy, tf.float32))
    dx, dw = tape.gradient(loss, [x, w])
    return y.numpy(), dx.numpy(), dw.numpy()


def test_values_and_gradients_match_the_definition_in_numpy():
    x, w, dy = _problem()
    y, dx, dw = _gradients(pointwise_conv2d, x, w, dy)
    # y[b, i, j, o] = sum_c x[b, i, j, c] w[c, o]; <y, dy> differentiated by hand.
    kernel = w[0, 0]
    np.testing.assert_allclose(y, np.einsum("bijc,co->bijo", x, kernel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum("bijo,co->bijc", dy, kernel), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw[0, 0], np.einsum("bijc,bijo->co", x, dy), rtol=1e-5, atol=1e-4)
    # ... and TensorFlow's own convolution gradient.
    ref = _gradients(lambda a, b: tf.nn.conv2d(a, b, 1, "VALID"), x, w, dy)
    for ours, theirs in zip((y, dx, dw), ref):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_numeric_gradient_check():
    x, w, _ = _problem(1, shape=(1, 3, 4, 3), filters=2)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, b: pointwise_conv2d(a, b), [tf.constant(x, tf.float64), tf.constant(w, tf.float64)])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_bfloat16_matches_float32_within_rounding_and_keeps_its_dtype():
    x, w, dy = _problem(2, shape=(2, 8, 8, 32), filters=16)
    half = _gradients(pointwise_conv2d, *(tf.cast(v, tf.bfloat16) for v in (x, w, dy)))
    full = _gradients(pointwise_conv2d, x, w, dy)
    for h, f in zip(half, full):
        assert h.dtype == tf.bfloat16.as_numpy_dtype
        scale = np.abs(f).max()
        assert np.abs(h.astype(np.float32) - f).max() <= 0.02 * scale


def test_unknown_batch_and_spatial_sizes_trace():
    fn = tf.function(lambda a, b: tf.gradients(tf.reduce_sum(pointwise_conv2d(a, b) ** 2), [a, b]),
                     input_signature=[tf.TensorSpec([None, None, None, 6]), tf.TensorSpec([1, 1, 6, 4])])
    x, w, _ = _problem()
    dx, dw = fn(x, w)
    assert dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize("args, error, match", [
    ((np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 2), np.float32)), ValueError, r"\[1, 1, Ci, Co\]"),
    ((np.zeros((4, 4, 3), np.float32), np.zeros((1, 1, 3, 2), np.float32)), ValueError, "channels last"),
    ((np.zeros((1, 4, 4, 5), np.float32), np.zeros((1, 1, 3, 2), np.float32)), ValueError, "5 channels"),
    ((np.zeros((1, 4, 4, 3), np.float32), tf.zeros((1, 1, 3, 2), tf.bfloat16)), TypeError, "bfloat16"),
])
def test_bad_inputs_are_named(args, error, match):
    with pytest.raises(error, match=match):
        pointwise_conv2d(*args)


# -- the layer ---------------------------------------------------------------------------------------


def _layer_pair(policy, strides=1):
    conv = keras.layers.Conv2D(4, 1, strides=strides, use_bias=True, activation="relu", dtype=policy)
    pointwise = PointwiseConv2D(4, strides=strides, use_bias=True, activation="relu", dtype=policy)
    conv.build((None, None, None, 6))
    pointwise.build((None, None, None, 6))
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=v.shape).astype(np.float32) for v in conv.weights]
    conv.set_weights(weights)
    pointwise.set_weights(weights)
    return conv, pointwise


def _layer_gradients(layer, x, training):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
    return [y] + tape.gradient(loss, [x] + layer.trainable_weights)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("training", [False, True])
def test_layer_equals_conv2d_in_outputs_and_gradients(policy, training):
    conv, pointwise = _layer_pair(policy)
    x, _, _ = _problem(4, shape=(2, 6, 5, 6))
    assert pointwise._uses_matmul_gradients(training) == training
    for ours, theirs in zip(_layer_gradients(pointwise, x, training), _layer_gradients(conv, x, training)):
        assert ours.dtype == theirs.dtype
        ours, theirs = np.asarray(tf.cast(ours, tf.float32)), np.asarray(tf.cast(theirs, tf.float32))
        # bfloat16: the two sum in different orders, 8 bits of mantissa.
        tolerance = 2e-5 if policy == "float32" else 0.02
        assert np.abs(ours - theirs).max() <= tolerance * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("policy, channels_in, filters, input_gradient", [
    ("mixed_bfloat16", 6, 4, "MatMul"),
    ("float32", 6, 4, "MatMul"),  # a reducing layer: both gradients are matrix products
    ("float32", 4, 6, "Conv2DBackpropInput"),  # an expanding one: oneDNN's backward-data convolution
])
def test_training_graph_takes_the_gradient_chosen_for_the_dtype_and_shape(policy, channels_in, filters,
                                                                         input_gradient):
    pointwise = PointwiseConv2D(filters, dtype=policy)
    pointwise.build((None, None, None, channels_in))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(pointwise(x, training=True), tf.float32))
        return tape.gradient(loss, [x, pointwise.kernel])

    graph = step.get_concrete_function(tf.TensorSpec([2, 8, 8, channels_in])).graph
    ops = [op.type for op in graph.get_operations()]
    for function in graph._functions.values():
        ops += [node.op for node in function.definition.node_def]
    assert "Conv2DBackpropFilter" not in ops
    matmuls = ops.count("MatMul") + ops.count("BatchMatMulV2")
    if input_gradient == "MatMul":
        assert "Conv2DBackpropInput" not in ops and matmuls == 2
    else:
        assert ops.count("Conv2DBackpropInput") == 1 and matmuls == 1


@pytest.mark.parametrize("channels_in, filters", [(6, 4), (4, 6)])
def test_float32_gradients_of_both_choices_match_the_definition(channels_in, filters):
    x, w, dy = _problem(6, shape=(2, 5, 4, channels_in), filters=filters)
    _, dx, dw = _gradients(pointwise_conv2d, x, w, dy)
    np.testing.assert_allclose(dx, np.einsum("bijo,co->bijc", dy, w[0, 0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw[0, 0], np.einsum("bijc,bijo->co", x, dy), rtol=1e-5, atol=1e-4)


def test_strided_layer_keeps_tensorflows_gradient():
    conv, pointwise = _layer_pair("mixed_bfloat16", strides=2)
    assert not pointwise._uses_matmul_gradients(True)
    x, _, _ = _problem(5, shape=(1, 7, 9, 6))
    for ours, theirs in zip(_layer_gradients(pointwise, x, True), _layer_gradients(conv, x, True)):
        np.testing.assert_array_equal(np.asarray(tf.cast(ours, tf.float32)), np.asarray(tf.cast(theirs, tf.float32)))


def test_layer_rejects_what_is_not_a_1x1_convolution():
    with pytest.raises(ValueError, match="1x1"):
        PointwiseConv2D(4, 3)
    with pytest.raises(ValueError, match="channels_last"):
        PointwiseConv2D(4, data_format="channels_first")
    with pytest.raises(ValueError, match="dilation_rate or groups"):
        PointwiseConv2D(4, dilation_rate=2)


def test_layer_round_trips_through_its_config():
    layer = PointwiseConv2D(8, strides=2, use_bias=False, name="p")
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == "kerasdet>PointwiseConv2D"
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is PointwiseConv2D and again.strides == (2, 2) and not again.use_bias


def test_resnet_weights_files_move_between_plain_conv2d_and_pointwise_layers(tmp_path, monkeypatch):
    """A .weights.h5 written when ResNet used keras.layers.Conv2D for its 1x1 convolutions loads into
    today's ResNet with the same outputs (Keras addresses layers by class-name paths)."""
    from kerasdet import backbones
    from kerasdet.backbones import resnet

    def plain(filters, kernel_size=1, **kwargs):
        return keras.layers.Conv2D(filters, kernel_size, **kwargs)

    x = np.random.default_rng(6).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    monkeypatch.setattr(resnet, "PointwiseConv2D", plain)
    old = backbones.get("resnet50", frozen_bn=True)
    assert not any(type(layer) is PointwiseConv2D for layer in old.layers)
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    expected = [np.asarray(v) for v in tf.nest.flatten(old(x))]
    monkeypatch.undo()
    new = backbones.get("resnet50", frozen_bn=True)
    assert sum(type(layer) is PointwiseConv2D for layer in new.layers) == 36  # 16 blocks x 2 + 4 projections
    new.load_weights(path)
    for ours, theirs in zip(tf.nest.flatten(new(x)), expected):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    with h5py.File(path) as handle:
        assert "layers/conv2d_52" in handle  # 53 convolutions, one class name
