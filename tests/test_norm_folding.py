"""Frozen BNs folded into the convolutions before them (backbones.norm_folding): same values and
gradients as running the layers one by one, the BN passes really gone from the inference and the
training graph, and nothing folded that must not be."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones.norm_folding import foldable_pairs
from kerasdet.backbones.resnet import ResNet, ResNetConv5Head
from kerasdet.layers.normalization import FrozenBatchNormalization


def randomize_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c),
                               rng.uniform(0.5, 2.0, c)])


def both_ways(model, x, training=False):
    model.fold_frozen_norms = True
    folded = model(x, training=training)
    model.fold_frozen_norms = False
    plain = model(x, training=training)
    model.fold_frozen_norms = True
    return folded, plain


@pytest.fixture(scope="module")
def resnet():
    model = ResNet(depth=50, freeze_at=0)
    randomize_norms(model)
    return model


def test_every_conv_bn_pair_of_resnet50_folds(resnet):
    pairs = foldable_pairs(resnet)
    # conv1 + 16 blocks x 3 convs + 4 projection shortcuts, each followed by its own frozen BN.
    assert len(pairs) == 53
    assert all(bn.name == conv.name.replace("conv", "bn").replace("downsample_0", "downsample_1")
               for conv, bn in pairs)
    assert len(foldable_pairs(ResNetConv5Head())) == 10


def test_folded_resnet_equals_layer_by_layer(resnet):
    x = tf.constant(np.random.default_rng(1).uniform(0, 255, (2, 64, 96, 3)).astype(np.float32))
    folded, plain = both_ways(resnet, x)
    for name in plain:
        scale = float(tf.reduce_max(tf.abs(plain[name])))
        np.testing.assert_allclose(folded[name].numpy(), plain[name].numpy(), atol=1e-5 * scale, rtol=1e-5)


def test_fold_removes_the_norm_passes_from_the_graph(resnet):
    # If a Keras upgrade breaks the fold (it runs through Functional._run_through_graph), the model
    # silently falls back to layer-by-layer BNs: this test is what notices.
    spec = tf.TensorSpec((5, 64, 64, 3), tf.float32)  # batch 5: no kernel has that leading size

    def elementwise_on_activations(fold, training):
        resnet.fold_frozen_norms = fold
        graph = tf.function(lambda t: resnet(t, training=training)).get_concrete_function(spec).graph
        resnet.fold_frozen_norms = True
        return sum(op.type == "Mul" and op.outputs[0].shape.rank == 4 and op.outputs[0].shape[0] == 5
                   for op in graph.get_operations())

    assert elementwise_on_activations(False, False) >= 53
    # What remains is the input normalization's multiply.
    assert elementwise_on_activations(True, False) <= 1
    assert elementwise_on_activations(True, None) <= 1
    assert elementwise_on_activations(True, True) <= 1


def _gradients(model, x):
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        # A nonlinear read of every output, so each map's gradient differs from pixel to pixel.
        loss = tf.add_n([tf.reduce_sum(tf.sin(tf.cast(out[k], tf.float64) / 10.0)) for k in sorted(out)])
    return tape.gradient(loss, model.trainable_variables)


def _relative_errors(grads, reference):
    return np.array([np.linalg.norm(g.numpy() - r.numpy()) / np.linalg.norm(r.numpy())
                     for g, r in zip(grads, reference)])


def test_folded_training_gradients_equal_layer_by_layer():
    # freeze_at=0: all 53 convs train, the stem included, each with a randomized frozen BN after it.
    keras.mixed_precision.set_global_policy("float64")
    try:
        exact = ResNet(depth=50, freeze_at=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    randomize_norms(exact, seed=7)
    x = np.random.default_rng(8).uniform(0, 255, (2, 64, 64, 3))
    exact.fold_frozen_norms = True
    folded64 = _gradients(exact, tf.constant(x))
    exact.fold_frozen_norms = False
    reference = _gradients(exact, tf.constant(x))
    assert len(reference) == 53 and all(g is not None for g in folded64)
    # In float64 the fold's chain rule (kernel x scale, the shift as a bias) is checked exactly.
    assert _relative_errors(folded64, reference).max() < 1e-9

    # In float32 (Winograd and oneDNN kernels) both ways carry the deep net's rounding: the fold may
    # not add to it. Measured here: median 2.7e-6 both ways, worst 6.2e-6 folded, 5.3e-6 layer by layer.
    model = ResNet(depth=50, freeze_at=0)
    model.set_weights(exact.get_weights())
    x32 = tf.constant(x.astype(np.float32))
    model.fold_frozen_norms = True
    folded = _relative_errors(_gradients(model, x32), reference)
    model.fold_frozen_norms = False
    plain = _relative_errors(_gradients(model, x32), reference)
    assert np.median(folded) < 1e-4 and folded.max() < 3 * max(plain.max(), 1e-4), (folded.max(), plain.max())


def test_probe_of_an_intermediate_conv_sees_the_conv_alone(resnet):
    probe = keras.Model(resnet.input, resnet.get_layer("conv1").output)
    x = tf.constant(np.random.default_rng(3).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32))
    normalized = resnet.get_layer("input_normalization")(x)
    conv = resnet.get_layer("conv1")
    expected = conv(resnet.get_layer("conv1_pad")(normalized))
    np.testing.assert_allclose(probe(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-4)


def test_nothing_folds_without_frozen_bn_or_into_deformable_convs():
    assert foldable_pairs(ResNet(depth=50, frozen_bn=False)) == []
    deformable = ResNet(depth=50, deformable_stages=(5,))
    names = {conv.name for conv, _ in foldable_pairs(deformable)}
    assert len(names) == 50 and not any(n.startswith("layer4") and n.endswith("conv2") for n in names)


def test_conv_with_bias_and_shared_output_are_handled():
    inputs = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=True, name="c1")(inputs)
    y = FrozenBatchNormalization(name="n1")(y)
    z = keras.layers.Conv2D(4, 1, name="c2")(y)
    side = FrozenBatchNormalization(name="n2")(z)
    other = keras.layers.ReLU()(z)  # c2's output has a second reader: n2 cannot be folded into it
    from kerasdet.backbones.base import Backbone

    model = Backbone(inputs=inputs, outputs={"a": side, "b": other}, strides={"a": 1, "b": 1})
    randomize_norms(model, seed=4)
    rng = np.random.default_rng(5)
    model.get_layer("c1").bias.assign(rng.normal(size=4))
    assert [(c.name, n.name) for c, n in foldable_pairs(model)] == [("c1", "n1")]
    x = tf.constant(rng.normal(size=(2, 8, 8, 3)).astype(np.float32))
    folded, plain = both_ways(model, x)
    for k in plain:
        np.testing.assert_allclose(folded[k].numpy(), plain[k].numpy(), rtol=1e-5, atol=1e-5)


def test_folded_resnet_under_mixed_bfloat16():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = ResNet(depth=50)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reference = ResNet(depth=50)
    randomize_norms(model)
    reference.set_weights(model.get_weights())
    x = tf.constant(np.random.default_rng(6).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32))
    out, ref = model(x), reference(x)
    for k in ref:
        assert out[k].dtype == tf.bfloat16
        # bfloat16 keeps 8 significant bits: compare relative to each map's magnitude.
        err = float(tf.reduce_max(tf.abs(tf.cast(out[k], tf.float32) - ref[k])))
        assert err <= 0.05 * float(tf.reduce_max(tf.abs(ref[k]))), k
