"""kerasdet.ops.strided_conv3x3 (stride-2 3x3 convolution, kernel gradient over the stride phases)
and its use by WinogradConv2D's strided layers (ResNet's downsampling 3x3 convs) in training."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers import WinogradConv2D
from kerasdet.ops import strided_conv3x3


def _problem(seed=0, shape=(2, 9, 8, 5), filters=3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    b, h, w, _ = shape
    x = rng.normal(size=shape).astype(dtype)
    kernel = rng.normal(size=(3, 3, shape[-1], filters)).astype(dtype)
    dy = rng.normal(size=(b, (h - 3) // 2 + 1, (w - 3) // 2 + 1, filters)).astype(dtype)
    return x, kernel, dy


def _gradients(fn, x, w, dy):
    x, w, dy = (tf.constant(v) for v in (x, w, dy))
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        y = fn(x, w)
        loss = tf.reduce_sum(y * dy)
    dx, dw = tape.gradient(loss, [x, w])
    return y.numpy(), dx.numpy(), dw.numpy()


def numpy_definition(x, w, dy):
    """y[b, i, j] = sum_{a, c} x[b, 2i + a, 2j + c] @ w[a, c], and <y, dy> differentiated by hand."""
    out_h, out_w = dy.shape[1:3]
    y = np.zeros(dy.shape, np.float64)
    dx = np.zeros(x.shape, np.float64)
    dw = np.zeros(w.shape, np.float64)
    for a in range(3):
        for c in range(3):
            window = x[:, a:a + 2 * out_h - 1:2, c:c + 2 * out_w - 1:2].astype(np.float64)
            y += window @ w[a, c]
            dw[a, c] = np.einsum("bijk,bijo->ko", window, dy)
            dx[:, a:a + 2 * out_h - 1:2, c:c + 2 * out_w - 1:2] += dy @ w[a, c].T
    return y, dx, dw


@pytest.mark.parametrize("shape", [(2, 9, 8, 5), (1, 8, 11, 4), (2, 3, 3, 2), (1, 4, 6, 3)],
                         ids=["odd_even", "even_odd", "one_window", "even_even"])
def test_values_and_gradients_match_the_definition_in_numpy(shape):
    x, w, dy = _problem(1, shape)
    ours = _gradients(strided_conv3x3, x, w, dy)
    for got, want in zip(ours, numpy_definition(x, w, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # ... and TensorFlow's own convolution and its gradients.
    theirs = _gradients(lambda a, b: tf.nn.conv2d(a, b, 2, "VALID"), x, w, dy)
    for got, want in zip(ours, theirs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_numeric_gradient_check():
    x, w, _ = _problem(2, shape=(1, 7, 6, 2), filters=2, dtype=np.float64)
    theoretical, numerical = tf.test.compute_gradient(strided_conv3x3, [tf.constant(x), tf.constant(w)])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_unknown_batch_and_spatial_sizes_trace():
    x, w, dy = _problem(3, shape=(2, 11, 10, 4))
    spec = tf.TensorSpec([None, None, None, 4])

    @tf.function(input_signature=[spec, tf.TensorSpec(w.shape), tf.TensorSpec([None, None, None, 3])])
    def gradients(x, w, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            loss = tf.reduce_sum(strided_conv3x3(x, w) * dy)
        return tape.gradient(loss, [x, w])

    for shape in [(2, 11, 10, 4), (1, 6, 7, 4)]:
        x, w, dy = _problem(4, shape, filters=3)
        _, want_dx, want_dw = numpy_definition(x, w, dy)
        dx, dw = gradients(x, w, dy)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("args, error, match", [
    ((np.zeros([4, 4, 3], np.float32), np.zeros([3, 3, 3, 2], np.float32)), ValueError, "inputs must be"),
    ((np.zeros([1, 4, 4, 3], np.float32), np.zeros([1, 1, 3, 2], np.float32)), ValueError, r"\[3, 3, Ci, Co\]"),
    ((np.zeros([1, 4, 4, 3], np.float32), tf.zeros([3, 3, 3, 2], tf.float64)), TypeError, "float64"),
    ((np.zeros([1, 4, 4, 5], np.float32), np.zeros([3, 3, 3, 2], np.float32)), ValueError, "5 channels"),
    ((np.zeros([1, 2, 4, 3], np.float32), np.zeros([3, 3, 3, 2], np.float32)), ValueError, "height is 2"),
])
def test_bad_inputs_are_named(args, error, match):
    with pytest.raises(error, match=match):
        strided_conv3x3(*args)


def _layer_pair(policy="float32", padding="valid"):
    plain = keras.layers.Conv2D(4, 3, strides=2, padding=padding, use_bias=True, activation="relu",
                                dtype=policy)
    strided = WinogradConv2D(4, 3, strides=2, padding=padding, use_bias=True, activation="relu",
                             dtype=policy)
    for layer in (plain, strided):
        layer.build((None, None, None, 6))
    weights = [np.random.default_rng(5).normal(size=v.shape).astype(np.float32) for v in plain.weights]
    plain.set_weights(weights)
    strided.set_weights(weights)
    return plain, strided


def _training_graph_ops(layer, channels=6):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32) ** 2)
        return tape.gradient(loss, [x, layer.kernel])

    graph = step.get_concrete_function(tf.TensorSpec([2, 9, 10, channels])).graph
    ops = [op.type for op in graph.get_operations()]
    for function in graph._functions.values():
        ops += [node.op for node in function.definition.node_def]
    return ops


def test_trained_float32_layer_takes_the_phase_gradient_and_equals_conv2d():
    plain, strided = _layer_pair()
    x = tf.constant(np.random.default_rng(6).normal(size=(2, 9, 10, 6)).astype(np.float32))
    for training in (True, False):
        results = []
        for layer in (strided, plain):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(y ** 2)
            results.append([y] + tape.gradient(loss, [x] + layer.trainable_weights))
        for ours, theirs in zip(*results):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    ops = _training_graph_ops(strided)
    assert "Conv2DBackpropFilter" not in ops and "MatMul" in ops
    assert "Conv2DBackpropFilter" in _training_graph_ops(plain)


@pytest.mark.parametrize("policy, padding, trainable", [
    ("mixed_bfloat16", "valid", True),  # not measured in bfloat16: TensorFlow's gradient
    ("float32", "same", True),  # "same" pads asymmetrically at stride 2; ResNet pads before
    ("float32", "valid", False),  # a frozen layer has no kernel gradient to speed up
])
def test_other_layers_keep_tensorflows_kernel_gradient(policy, padding, trainable):
    _, strided = _layer_pair(policy, padding)
    strided.trainable = trainable
    assert "Conv2DBackpropFilter" in _training_graph_ops(strided) or not trainable
    assert not strided._uses_strided_phases(tf.zeros([1, 9, 9, 6], strided.compute_dtype), True)


def test_frozen_norm_fold_of_a_resnet_takes_the_phase_gradient():
    from kerasdet.backbones.resnet import ResNet

    model = ResNet(depth=50, frozen_bn=True, freeze_at=0)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            outputs = model(x, training=True)
            loss = tf.add_n([tf.reduce_sum(v) for v in outputs.values()])
        return tape.gradient(loss, model.trainable_weights)

    graph = step.get_concrete_function(tf.TensorSpec([1, 64, 64, 3])).graph
    filter_gradients = {op.name.split("/")[2] for op in graph.get_operations()
                        if op.type == "Conv2DBackpropFilter"}
    # Left to TensorFlow: the 7x7 stem, layer1's 64-channel 3x3s (below the Winograd threshold) and
    # the three strided 1x1 shortcuts; the strided 3x3s take the phase product.
    assert filter_gradients == {"conv1", "layer1_0_conv2", "layer1_1_conv2", "layer1_2_conv2",
                                "layer2_0_downsample_0", "layer3_0_downsample_0",
                                "layer4_0_downsample_0"}
