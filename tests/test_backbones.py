"""Tests of kerasdet.backbones and kerasdet.layers.normalization against plain-numpy references."""
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasdet.backbones as backbones
from kerasdet.backbones.base import CAFFE_BGR_MEAN, TORCHVISION_MEAN, TORCHVISION_STD, ImageNormalization
from kerasdet.backbones.resnet import ResNet, ResNetConv5Head, resnet_c4
from kerasdet.backbones.tiny import TinyBackbone
from kerasdet.layers.normalization import FrozenBatchNormalization, L2Normalization, LocalResponseNormalization


# ----------------------------------------------------------------------------- numpy references

def np_conv2d(x, kernel, bias=None, stride=1, pad=0, dilation=1):
    """Cross-correlation as in PyTorch/Caffe: x [B,H,W,C], kernel [kh,kw,C,O], symmetric zero pad."""
    if isinstance(pad, int):
        pad = (pad, pad, pad, pad)
    top, bottom, left, right = pad
    x = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = kernel.shape[:2]
    eh, ew = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    ho = (x.shape[1] - eh) // stride + 1
    wo = (x.shape[2] - ew) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i * dilation: i * dilation + stride * (ho - 1) + 1: stride,
                      j * dilation: j * dilation + stride * (wo - 1) + 1: stride, :]
            out += patch @ kernel[i, j].astype(np.float64)
    if bias is not None:
        out += bias
    return out


def np_maxpool(x, size, stride, pad=0):
    """Max pooling with PyTorch's implicit -inf padding."""
    x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    ho = (x.shape[1] - size) // stride + 1
    wo = (x.shape[2] - size) // stride + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(size):
        for j in range(size):
            out = np.maximum(out, x[:, i: i + stride * (ho - 1) + 1: stride, j: j + stride * (wo - 1) + 1: stride])
    return out


def np_batchnorm(x, gamma, beta, mean, var, eps):
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def torch_out_size(n, kernel, stride, pad):
    """PyTorch's documented Conv2d / MaxPool2d output size (floor mode)."""
    return (n + 2 * pad - kernel) // stride + 1


def torch_param_count(model):
    """Parameters as PyTorch counts them: every weight except the BN running statistics (buffers)."""
    return sum(int(np.prod(w.shape)) for w in model.weights
               if not w.path.endswith(("moving_mean", "moving_variance")))


def bottleneck_params(in_ch, planes, downsample):
    """Parameters of a torchvision Bottleneck from its definition (bias-free convs, BN gamma+beta)."""
    n = in_ch * planes + 2 * planes                    # conv1 1x1 + bn1
    n += 9 * planes * planes + 2 * planes              # conv2 3x3 + bn2
    n += planes * 4 * planes + 2 * 4 * planes          # conv3 1x1 + bn3
    if downsample:
        n += in_ch * 4 * planes + 2 * 4 * planes       # downsample conv + bn
    return n


def stage_params(in_ch, planes, blocks):
    return bottleneck_params(in_ch, planes, True) + (blocks - 1) * bottleneck_params(4 * planes, planes, False)


def randomize_bn(layer, rng):
    c = layer.gamma.shape[0]
    layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c),
                       rng.uniform(0.5, 2.0, c)])


# ----------------------------------------------------------------------------- FrozenBatchNormalization

def test_frozen_bn_matches_numpy_and_ignores_training():
    rng = np.random.default_rng(0)
    layer = FrozenBatchNormalization(epsilon=1e-5)
    x = rng.normal(2.0, 3.0, (2, 5, 4, 6)).astype(np.float32)
    layer.build(x.shape)
    gamma, beta, mean = rng.normal(size=6), rng.normal(size=6), rng.normal(size=6)
    var = rng.uniform(0.1, 3.0, 6)
    layer.set_weights([gamma, beta, mean, var])
    expected = np_batchnorm(x.astype(np.float64), gamma, beta, mean, var, 1e-5)
    np.testing.assert_allclose(layer(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Statistics are untouched by a training-mode call.
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-6)


@pytest.mark.parametrize("axis,center,scale", [(-1, True, True), (1, True, True), (-1, False, False)])
def test_frozen_bn_axis_center_scale_match_numpy(axis, center, scale):
    rng = np.random.default_rng(3)
    layer = FrozenBatchNormalization(axis=axis, center=center, scale=scale, epsilon=1e-3)
    x = rng.normal(1.0, 2.0, (2, 5, 4, 6)).astype(np.float32)
    layer.build(x.shape)
    c = x.shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.1, 3.0, c)
    layer.set_weights(([gamma] if scale else []) + ([beta] if center else []) + [mean, var])
    shape = [1, 1, 1, 1]
    shape[axis] = c
    expected = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-3)
    expected = expected * (gamma.reshape(shape) if scale else 1) + (beta.reshape(shape) if center else 0)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_frozen_bn_stays_in_half_precision_under_mixed_policy():
    # Under mixed_bfloat16 the affine map runs in bfloat16: same dtype out, values within bfloat16's
    # rounding of the float32 result, and no float32 copy of the activations in the graph.
    rng = np.random.default_rng(4)
    layer = FrozenBatchNormalization(epsilon=1e-5, dtype="mixed_bfloat16")
    x = rng.normal(0.0, 2.0, (2, 8, 8, 16)).astype(np.float32)
    layer.build(x.shape)
    layer.set_weights([rng.uniform(0.5, 1.5, 16), rng.normal(size=16), rng.normal(size=16),
                       rng.uniform(0.1, 3.0, 16)])
    reference = FrozenBatchNormalization(epsilon=1e-5)
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    xb = tf.cast(x, tf.bfloat16)
    y = layer(xb)
    assert y.dtype == tf.bfloat16 and layer.variable_dtype == "float32"
    expected = reference(tf.cast(xb, tf.float32)).numpy()
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), expected, rtol=2e-2, atol=2e-2)
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec(x.shape, tf.bfloat16)).graph
    full_size_casts = [op for op in graph.get_operations() if op.type == "Cast"
                       and op.outputs[0].shape.num_elements() == x.size]
    assert full_size_casts == []


def test_frozen_bn_has_no_trainable_weights_even_when_unfrozen():
    layer = FrozenBatchNormalization()
    model = keras.Sequential([keras.Input((3, 3, 4)), keras.layers.Conv2D(4, 1), layer])
    assert layer.trainable_weights == []
    assert layer.trainable is False
    model.trainable = True
    assert layer.trainable_weights == []
    assert [id(w) for w in model.trainable_weights] == [id(w) for w in model.layers[0].weights]
    assert len(layer.non_trainable_weights) == 4


def test_frozen_bn_loads_batchnorm_weights_and_round_trips_config():
    rng = np.random.default_rng(1)
    bn = keras.layers.BatchNormalization(epsilon=1e-5)
    bn.build((None, 8))
    weights = [rng.normal(size=8), rng.normal(size=8), rng.normal(size=8), rng.uniform(0.5, 2, 8)]
    bn.set_weights(weights)
    frozen = FrozenBatchNormalization(epsilon=1e-5)
    frozen.build((None, 8))
    frozen.set_weights(bn.get_weights())
    assert [w.name for w in frozen.weights] == [w.name for w in bn.weights]
    x = rng.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(frozen(x).numpy(), bn(x, training=False).numpy(), rtol=1e-6, atol=1e-6)
    clone = FrozenBatchNormalization.from_config(frozen.get_config())
    assert clone.epsilon == frozen.epsilon and clone.trainable is False


def test_frozen_bn_gradient():
    rng = np.random.default_rng(2)
    layer = FrozenBatchNormalization(epsilon=1e-5)
    layer.build((None, 3))
    gamma, var = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    layer.set_weights([gamma, rng.normal(size=3), rng.normal(size=3), var])
    x = tf.constant(rng.normal(size=(4, 3)), tf.float64)
    theoretical, numerical = tf.test.compute_gradient(lambda t: layer(tf.cast(t, tf.float32)), [x])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-2)
    # dy/dx is the diagonal scale gamma / sqrt(var + eps) from the definition.
    with tf.GradientTape() as tape:
        xv = tf.Variable(tf.cast(x, tf.float32))
        y = tf.reduce_sum(layer(xv))
    expected = np.broadcast_to(gamma / np.sqrt(var + 1e-5), (4, 3))
    np.testing.assert_allclose(tape.gradient(y, xv).numpy(), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- LRN and input normalization

def np_lrn(x, size, alpha, beta, k):
    """Caffe ACROSS_CHANNELS LRN: a / (k + alpha/n * sum of squares over n channels) ** beta."""
    c = x.shape[-1]
    half = size // 2
    out = np.empty_like(x, dtype=np.float64)
    for ch in range(c):
        lo, hi = max(0, ch - half), min(c, ch + half + 1)
        s = np.sum(x[..., lo:hi].astype(np.float64) ** 2, axis=-1)
        out[..., ch] = x[..., ch] / (k + alpha / size * s) ** beta
    return out


def test_lrn_matches_numpy_and_gradient():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 30.0, (2, 3, 4, 7)).astype(np.float32)
    layer = LocalResponseNormalization(size=3, alpha=5e-3, beta=0.75, k=2.0)
    np.testing.assert_allclose(layer(x).numpy(), np_lrn(x, 3, 5e-3, 0.75, 2.0), rtol=1e-5, atol=1e-5)
    small = tf.constant(rng.normal(0, 3.0, (1, 2, 2, 5)), tf.float64)
    theoretical, numerical = tf.test.compute_gradient(lambda t: layer(tf.cast(t, tf.float32)), [small])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-2)
    clone = LocalResponseNormalization.from_config(layer.get_config())
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy())
    with pytest.raises(ValueError, match="size"):
        LocalResponseNormalization(size=4)


def test_image_normalization_torchvision_and_caffe():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 255, (2, 3, 3, 3)).astype(np.float32)
    tv = ImageNormalization(TORCHVISION_MEAN, TORCHVISION_STD)
    expected = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(tv(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    caffe = ImageNormalization(CAFFE_BGR_MEAN, (1, 1, 1), bgr=True)
    np.testing.assert_allclose(caffe(x).numpy(), x[..., ::-1] - np.array(CAFFE_BGR_MEAN), rtol=1e-5, atol=1e-4)
    assert ImageNormalization.from_config(caffe.get_config()).bgr is True
    # Gradient of the affine map: d y_c / d x_c' = 1 / std_c for the channel c' that feeds c.
    small = tf.constant(rng.uniform(0, 255, (1, 2, 2, 3)), tf.float64)
    theoretical, numerical = tf.test.compute_gradient(lambda t: tv(tf.cast(t, tf.float32)), [small])
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(np.diag(theoretical[0]), np.tile(1 / np.array(TORCHVISION_STD), 4), rtol=1e-5)
    with pytest.raises(ValueError, match="std"):
        ImageNormalization((0, 0, 0), (1, 0, 1))


# ----------------------------------------------------------------------------- ResNet

@pytest.fixture(scope="module")
def r50():
    """Default ResNet-50 (frozen BN, freeze_at=2) with the fc top, shared by the read-only tests."""
    return ResNet(50, include_top=True)


@pytest.fixture(scope="module")
def r101():
    return ResNet(101, include_top=True)


def test_resnet_parameter_counts_match_torchvision(r50, r101):
    # Stem conv1 7x7x3x64 + bn1, four stages, fc 2048 -> 1000; the published totals are 23,508,032
    # (ResNet-50 without fc), 25,557,032 (with fc) and 44,549,160 (ResNet-101 with fc).
    def expected(blocks, fc):
        n = 7 * 7 * 3 * 64 + 2 * 64
        in_ch = 64
        for planes, b in zip((64, 128, 256, 512), blocks):
            n += stage_params(in_ch, planes, b)
            in_ch = 4 * planes
        return n + (2048 * 1000 + 1000 if fc else 0)

    assert torch_param_count(r50) == expected((3, 4, 6, 3), True) == 25_557_032
    fc_params = sum(int(np.prod(w.shape)) for w in r50.get_layer("fc").weights)
    assert torch_param_count(r50) - fc_params == expected((3, 4, 6, 3), False) == 23_508_032
    assert torch_param_count(r101) == expected((3, 4, 23, 3), True) == 44_549_160


def test_resnet50_output_names_shapes_and_strides(r50):
    assert r50.strides == {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    assert r50.feature_names == ["C2", "C3", "C4", "C5"]
    specs = r50.compute_output_spec(keras.KerasTensor((1, 224, 224, 3)))
    shapes = {k: tuple(v.shape) for k, v in specs.items()}
    assert shapes == {"C2": (1, 56, 56, 256), "C3": (1, 28, 28, 512), "C4": (1, 14, 14, 1024),
                      "C5": (1, 7, 7, 2048), "logits": (1, 1000)}


@pytest.mark.parametrize("height,width", [(64, 64), (97, 75)])
def test_resnet_sizes_follow_pytorch_symmetric_padding(height, width, r50):
    out = r50(np.zeros((1, height, width, 3), np.float32))

    def sizes(n):
        n = torch_out_size(n, 7, 2, 3)      # conv1
        n = torch_out_size(n, 3, 2, 1)      # maxpool
        result = [n]
        for _ in range(3):                  # the strided 3x3 conv of layer2..layer4
            n = torch_out_size(n, 3, 2, 1)
            result.append(n)
        return result

    for name, h, w, c in zip(("C2", "C3", "C4", "C5"), sizes(height), sizes(width), (256, 512, 1024, 2048)):
        assert tuple(out[name].shape) == (1, h, w, c), name


def test_resnet_stem_matches_numpy(r50):
    rng = np.random.default_rng(5)
    model = r50
    randomize_bn(model.get_layer("bn1"), rng)
    probe = keras.Model(model.input, [model.get_layer("conv1").output, model.get_layer("maxpool").output])
    x = rng.uniform(0, 255, (1, 37, 42, 3)).astype(np.float32)
    conv_out, pool_out = probe(x)
    normalized = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    kernel = model.get_layer("conv1").get_weights()[0]
    expected_conv = np_conv2d(normalized, kernel, stride=2, pad=3)
    np.testing.assert_allclose(conv_out.numpy(), expected_conv, rtol=1e-4, atol=1e-3)
    bn1 = model.get_layer("bn1")
    assert isinstance(bn1, FrozenBatchNormalization) and bn1.epsilon == 1e-5 and bn1.momentum == 0.9
    gamma, beta, mean, var = bn1.get_weights()
    act = np.maximum(np_batchnorm(expected_conv, gamma, beta, mean, var, 1e-5), 0)
    np.testing.assert_allclose(pool_out.numpy(), np_maxpool(act, 3, 2, pad=1), rtol=1e-4, atol=1e-3)


def test_resnet_downsampling_bottleneck_matches_numpy(r50):
    rng = np.random.default_rng(6)
    model = r50
    prefix = "layer2_0"
    for suffix in ("bn1", "bn2", "bn3", "downsample_1"):
        randomize_bn(model.get_layer(f"{prefix}_{suffix}"), rng)
    probe = keras.Model(model.input, [model.get_layer("layer1_2_out").output,
                                      model.get_layer(f"{prefix}_out").output])
    x = rng.uniform(0, 1, (1, 30, 38, 3)).astype(np.float32)
    block_in, block_out = (t.numpy() for t in probe(x))

    def conv(name, y, stride=1, pad=0):
        return np_conv2d(y, model.get_layer(f"{prefix}_{name}").get_weights()[0], stride=stride, pad=pad)

    def bn(name, y):
        return np_batchnorm(y, *model.get_layer(f"{prefix}_{name}").get_weights(), 1e-5)

    y = np.maximum(bn("bn1", conv("conv1", block_in)), 0)
    y = np.maximum(bn("bn2", conv("conv2", y, stride=2, pad=1)), 0)   # v1.5: stride on the 3x3
    y = bn("bn3", conv("conv3", y))
    shortcut = bn("downsample_1", conv("downsample_0", block_in, stride=2))
    expected = np.maximum(y + shortcut, 0)
    np.testing.assert_allclose(block_out, expected, rtol=1e-4, atol=1e-4)


def torchvision_resnet_keys(blocks):
    """The state-dict keys of torchvision's ResNet (Bottleneck), listed from its module structure."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in bn]
    for stage, n in enumerate(blocks, 1):
        for b in range(n):
            prefix = f"layer{stage}.{b}"
            for i in (1, 2, 3):
                keys += [f"{prefix}.conv{i}.weight"] + [f"{prefix}.bn{i}.{p}" for p in bn]
            if b == 0:
                keys += [f"{prefix}.downsample.0.weight"] + [f"{prefix}.downsample.1.{p}" for p in bn]
    return keys + ["fc.weight", "fc.bias"]


def torch_key_to_keras(key):
    """The mapping rule of the resnet module docstring."""
    module, param = key.rsplit(".", 1)
    is_bn = module.split(".")[-1].startswith("bn") or module.endswith("downsample.1")
    if is_bn:
        param = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                 "running_var": "moving_variance"}[param]
    else:
        param = {"weight": "kernel", "bias": "bias"}[param]
    return f"{module.replace('.', '_')}/{param}"


@pytest.mark.parametrize("depth,blocks", [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))])
def test_resnet_weights_map_one_to_one_to_torchvision_keys(depth, blocks, r50, r101):
    model = r50 if depth == 50 else r101
    keras_paths = [w.path for w in model.weights]
    assert len(keras_paths) == len(set(keras_paths))
    assert sorted(keras_paths) == sorted(torch_key_to_keras(k) for k in torchvision_resnet_keys(blocks))


def fake_torchvision_state_dict(model, blocks, rng):
    """Random arrays in torchvision's layout for every key of the architecture (plus the BN counters)."""
    keras_weights = {w.path: w for w in model.weights}
    state = {}
    for key in torchvision_resnet_keys(blocks):
        shape = tuple(keras_weights[torch_key_to_keras(key)].shape)
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])      # [kh, kw, in, out] -> [out, in, kh, kw]
        elif len(shape) == 2:
            shape = shape[::-1]
        low = 0.5 if key.endswith("running_var") else -1.0
        state[key] = rng.uniform(low, 1.0, shape).astype(np.float32)
        if key.endswith("running_var"):
            state[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(7)
    return state


def test_load_torchvision_weights_into_resnet_and_conv5_head(r50):
    rng = np.random.default_rng(13)
    state = fake_torchvision_state_dict(r50, (3, 4, 6, 3), rng)
    used = backbones.load_torchvision_weights(r50, state)
    assert sorted(used) == sorted(k for k in state if not k.endswith("num_batches_tracked"))
    weights = {w.path: w.numpy() for w in r50.weights}
    np.testing.assert_array_equal(weights["layer3_2_conv2/kernel"], state["layer3.2.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights["fc/kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(weights["layer1_0_downsample_1/moving_variance"],
                                  state["layer1.0.downsample.1.running_var"])
    # The stem computed from the torch-layout kernel directly: out[o] = sum_{i,u,v} w[o, i, u, v] x[i, ...].
    probe = keras.Model(r50.input, r50.get_layer("conv1").output)
    x = rng.uniform(0, 255, (1, 20, 22, 3)).astype(np.float32)
    normalized = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    padded = np.pad(normalized, ((0, 0), (3, 3), (3, 3), (0, 0)))
    w = state["conv1.weight"].astype(np.float64)
    expected = np.zeros((1, 10, 11, 64))
    for r in range(10):
        for c in range(11):
            expected[0, r, c] = np.einsum("oiuv,uvi->o", w, padded[0, 2 * r:2 * r + 7, 2 * c:2 * c + 7])
    np.testing.assert_allclose(probe(x).numpy(), expected, rtol=1e-4, atol=1e-3)

    head = ResNetConv5Head()
    used = backbones.load_torchvision_weights(head, state)
    assert used and all(k.startswith("layer4.") for k in used)
    np.testing.assert_array_equal(head.get_layer("layer4_0_conv2").get_weights()[0],
                                  state["layer4.0.conv2.weight"].transpose(2, 3, 1, 0))

    broken = dict(state)
    del broken["layer2.1.bn2.running_mean"]
    with pytest.raises(ValueError, match="layer2_1_bn2/moving_mean"):
        backbones.load_torchvision_weights(r50, broken)
    broken = dict(state, **{"layer2.1.conv1.weight": np.zeros((128, 512, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="layer2.1.conv1.weight"):
        backbones.load_torchvision_weights(r50, broken)
    broken = dict(state, **{"bn1.running_var": np.full(64, np.nan, np.float32)})
    with pytest.raises(ValueError, match="bn1.running_var.*NaN"):
        backbones.load_torchvision_weights(r50, broken)


def test_deformable_resnet_starts_as_the_plain_one(r50):
    # Deformable ConvNets v1 in res5: the offset convs start at zero, so after loading the same
    # torchvision weights the network computes exactly what the plain ResNet does.
    rng = np.random.default_rng(15)
    state = fake_torchvision_state_dict(r50, (3, 4, 6, 3), rng)
    dcn = ResNet(50, include_top=True, deformable_stages=(5,), extra_res6=True)   # res6: not in torchvision
    offset_weights = [w.path for w in dcn.weights if "offset_conv" in w.path]
    assert offset_weights and all(p.startswith("layer4_") for p in offset_weights)
    assert all(any(w.path == p for w in dcn.trainable_weights) for p in offset_weights)
    backbones.load_torchvision_weights(r50, state)
    backbones.load_torchvision_weights(dcn, state)
    x = rng.uniform(0, 255, (1, 48, 40, 3)).astype(np.float32)
    plain, deformable = r50(x), dcn(x)
    np.testing.assert_allclose(deformable["C5"].numpy(), plain["C5"].numpy(), rtol=1e-4, atol=1e-4)
    assert ResNet.from_config(dcn.get_config()).get_config() == dcn.get_config()
    with pytest.raises(ValueError, match="deformable_stages"):
        ResNet(50, deformable_stages=(2,))
    with pytest.raises(ValueError, match="deformable_version"):
        ResNet(50, deformable_stages=(5,), deformable_version=3)
    head = ResNetConv5Head(deformable=2)
    assert any("offset_conv" in w.path for w in head.weights)
    assert tuple(head(np.zeros((2, 14, 14, 1024), np.float32)).shape) == (2, 7, 7, 2048)


def _trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("freeze_at", [0, 2, 5])
def test_resnet_freeze_at_leaves_expected_variables_trainable(freeze_at):
    model = ResNet(50, frozen_bn=False, freeze_at=freeze_at)
    stem = 7 * 7 * 3 * 64 + 2 * 64
    stages = [stage_params(64, 64, 3), stage_params(256, 128, 4), stage_params(512, 256, 6),
              stage_params(1024, 512, 3)]
    expected = (stem if freeze_at < 1 else 0) + sum(p for k, p in enumerate(stages, 1) if k >= freeze_at)
    assert _trainable_params(model) == expected
    for w in model.trainable_weights:
        layer = w.path.split("/")[0]
        stage = 0 if layer in ("conv1", "bn1") else int(layer[len("layer")])
        assert stage >= freeze_at, w.path
        assert not w.path.endswith(("moving_mean", "moving_variance"))


def test_resnet_frozen_bn_keeps_only_conv_kernels_trainable(r50):
    # Default: frozen BN and freeze_at=2, so the conv kernels of layer2..layer4 plus fc remain.
    assert all(w.path.endswith("kernel") or w.path == "fc/bias" for w in r50.trainable_weights)
    convs, in_ch = 0, 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for b in range(blocks):
            cin = in_ch if b == 0 else 4 * planes
            if stage >= 2:
                convs += cin * planes + 9 * planes * planes + planes * 4 * planes + (cin * 4 * planes if b == 0 else 0)
        in_ch = 4 * planes
    assert _trainable_params(r50) == convs + 2048 * 1000 + 1000


def test_resnet_frozen_stage_batchnorm_does_not_update_statistics():
    model = ResNet(50, frozen_bn=False, freeze_at=2)
    frozen, live = model.get_layer("layer1_0_bn1"), model.get_layer("layer2_0_bn1")
    before = frozen.moving_mean.numpy().copy(), live.moving_mean.numpy().copy()
    model(np.random.default_rng(7).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32), training=True)
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), before[0])
    assert not np.allclose(live.moving_mean.numpy(), before[1])


def test_resnet_c4_split_and_conv5_head(r50):
    trunk, head = resnet_c4(50)
    assert trunk.strides == {"C2": 4, "C3": 8, "C4": 16}
    assert not any(layer.name.startswith("layer4") for layer in trunk.layers)
    rois = np.random.default_rng(8).normal(size=(3, 14, 14, 1024)).astype(np.float32)
    assert tuple(head(rois).shape) == (3, 7, 7, 2048)
    assert torch_param_count(head) == stage_params(1024, 512, 3)
    full = {w.path for w in r50.weights if w.path.startswith("layer4")}
    assert {w.path for w in head.weights} == full
    pooled = ResNetConv5Head(global_pool=True)
    assert tuple(pooled(rois).shape) == (3, 2048)
    clone = ResNetConv5Head.from_config(pooled.get_config())
    assert clone.get_config() == pooled.get_config()


def test_resnet_config_round_trip_and_bad_arguments():
    model = ResNet(50, frozen_bn=False, freeze_at=3, input_normalization="caffe", name="r50_caffe")
    clone = ResNet.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    assert [w.path for w in clone.weights] == [w.path for w in model.weights]
    assert _trainable_params(clone) == _trainable_params(model)
    with pytest.raises(ValueError, match="depth"):
        ResNet(34)
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(50, freeze_at=6)
    with pytest.raises(ValueError, match="input_shape"):
        ResNet(50, input_shape=(64, 64, 1))
    with pytest.raises(ValueError, match="input_normalization"):
        ResNet(50, input_normalization="imagenet")


# ----------------------------------------------------------------------------- tiny backbone, registry

def test_tiny_backbone_is_small_fast_and_strided():
    # CPU time of this process, so that other jobs on a shared machine do not make the test flaky.
    start = time.process_time()
    model = TinyBackbone()
    elapsed = time.process_time() - start
    assert elapsed < 1.0, f"TinyBackbone took {elapsed:.2f}s of CPU to build"
    assert model.count_params() < 100_000
    assert model.strides == {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    out = model(np.zeros((2, 67, 96, 3), np.float32))
    h, w = 67, 96
    for name, c in zip(("stem", "C2", "C3", "C4", "C5"), (8, 16, 32, 48, 64)):
        h, w = torch_out_size(h, 3, 2, 1), torch_out_size(w, 3, 2, 1)   # each conv is 3x3/2, pad 1
        if name != "stem":
            assert tuple(out[name].shape) == (2, h, w, c), name


def test_tiny_backbone_saves_and_loads(tmp_path):
    model = TinyBackbone(channels=(4, 8, 8, 8, 8))
    x = np.random.default_rng(9).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, TinyBackbone) and loaded.strides == model.strides
    for name, value in model(x).items():
        np.testing.assert_allclose(loaded(x)[name].numpy(), value.numpy(), rtol=1e-6)


def test_registry_lists_gets_and_rejects_unknown_names():
    names = backbones.list()
    for expected in ("resnet50", "resnet101", "tiny"):
        assert expected in names
    model = backbones.get("tiny", channels=(4, 4, 4, 4, 4))
    assert isinstance(model, TinyBackbone) and model.strides["C5"] == 32
    assert "resnet50_c4" in names and "resnet101_c4" in names
    with pytest.raises(KeyError, match="resnet18"):
        backbones.get("resnet18")


def test_backbone_runs_in_tf_function():
    model = TinyBackbone()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def features(images):
        return model(images)

    out = features(tf.zeros((1, 50, 70, 3)))
    assert tuple(out["C5"].shape) == (1, 2, 3, 64)


# ----------------------------------------------------------------------------- VGG-16

def caffe_ceil_out_size(n, kernel, stride, pad=0):
    """Caffe's pooling output size (ceil mode)."""
    return -(-(n + 2 * pad - kernel) // stride) + 1


def vgg16_conv_params():
    n, in_ch = 0, 3
    for filters, repeats in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(repeats):
            n += 9 * in_ch * filters + filters
            in_ch = filters
    return n


def test_vgg16_parameter_count_and_outputs():
    model = backbones.get("vgg16", include_top=True, input_shape=(224, 224, 3))
    fc = (7 * 7 * 512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
    assert model.count_params() == vgg16_conv_params() + fc == 138_357_544
    assert model.strides == {"conv4_3": 8, "conv5_3": 16, "pool5": 32}
    shapes = {k: tuple(v.shape) for k, v in model.output.items()}
    assert shapes == {"conv4_3": (None, 28, 28, 512), "conv5_3": (None, 14, 14, 512), "pool5": (None, 7, 7, 512),
                      "fc7": (None, 4096), "logits": (None, 1000)}
    with pytest.raises(ValueError, match="224"):
        backbones.get("vgg16", include_top=True)


def test_vgg16_ceil_mode_sizes_on_odd_input():
    model = backbones.get("vgg16")
    out = model(np.zeros((1, 75, 50, 3), np.float32))
    h, w, sizes = 75, 50, {}
    for block in range(1, 6):
        if block in (4, 5):
            sizes[f"conv{block}_3"] = (h, w)
        h, w = caffe_ceil_out_size(h, 2, 2), caffe_ceil_out_size(w, 2, 2)
    sizes["pool5"] = (h, w)
    for name, (h, w) in sizes.items():
        assert tuple(out[name].shape[1:3]) == (h, w), name


def test_vgg16_reduced_matches_refinedet_layout():
    model = backbones.get("vgg16_reduced")
    extra = (9 * 512 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 256 + 256) + (9 * 256 * 512 + 512)
    assert model.count_params() == vgg16_conv_params() + extra
    assert model.strides == {"conv4_3": 8, "conv5_3": 16, "fc7": 16, "conv6_2": 32}
    # RefineDet320: detection layers of 40, 20, 20 and 10 pixels.
    shapes = {k: tuple(v.shape) for k, v in model(np.zeros((1, 320, 320, 3), np.float32)).items()}
    assert shapes == {"conv4_3": (1, 40, 40, 512), "conv5_3": (1, 20, 20, 512), "fc7": (1, 20, 20, 1024),
                      "conv6_2": (1, 10, 10, 512)}


def test_vgg16_refinedet_strides_follow_the_paper():
    # Seed 002 (sec. 4, anchors design): the four detection layers have total strides 8, 16, 32 and 64.
    model = backbones.get("vgg16_refinedet")
    assert model.strides == {"conv4_3": 8, "conv5_3": 16, "fc7": 32, "conv6_2": 64}
    assert model.count_params() == backbones.get("vgg16_reduced").count_params()
    for size in (320, 512):
        specs = model.compute_output_spec(keras.KerasTensor((1, size, size, 3)))
        for name, stride in model.strides.items():
            assert tuple(specs[name].shape[1:3]) == (size // stride,) * 2, (size, name)
    with pytest.raises(ValueError, match="reduced_style"):
        backbones.VGG16(reduced=True, reduced_style="yolo")


@pytest.mark.parametrize("name", ["vgg16_reduced", "vgg16_refinedet"])
def test_vgg16_reduced_dilated_fc6_and_conv6_2_match_numpy(name):
    rng = np.random.default_rng(10)
    model = backbones.get(name, input_normalization=None)
    probe = keras.Model(model.input, [model.get_layer("conv5_3").output, model.get_layer("conv_fc6").output,
                                      model.get_layer("conv6_1").output, model.get_layer("conv6_2").output])
    x = rng.uniform(0, 1, (1, 128, 96, 3)).astype(np.float32)   # conv5_3 8x6: pool5 2x2/2 has no ceil case
    conv5_3, fc6, conv6_1, conv6_2 = (t.numpy() for t in probe(x))
    if name == "vgg16_reduced":   # SSD: pool5 3x3/1 pad 1, conv_fc6 dilation 6
        pool5, dilation = np_maxpool(conv5_3, 3, 1, pad=1), 6
    else:                         # RefineDet: pool5 2x2/2, conv_fc6 dilation 3
        pool5, dilation = np_maxpool(conv5_3, 2, 2), 3
    kernel, bias = model.get_layer("conv_fc6").get_weights()
    expected_fc6 = np.maximum(np_conv2d(pool5, kernel, bias, pad=dilation, dilation=dilation), 0)
    np.testing.assert_allclose(fc6, expected_fc6, rtol=1e-4, atol=1e-4)
    kernel, bias = model.get_layer("conv6_2").get_weights()
    expected_6_2 = np.maximum(np_conv2d(conv6_1, kernel, bias, stride=2, pad=1), 0)
    np.testing.assert_allclose(conv6_2, expected_6_2, rtol=1e-4, atol=1e-4)


def test_vgg16_freeze_blocks():
    model = backbones.get("vgg16_reduced", freeze_blocks=2)
    trainable_layers = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable_layers == {"conv3_1", "conv3_2", "conv3_3", "conv4_1", "conv4_2", "conv4_3", "conv5_1",
                                "conv5_2", "conv5_3", "conv_fc6", "conv_fc7", "conv6_1", "conv6_2"}
    frozen = (9 * 3 * 64 + 64) + (9 * 64 * 64 + 64) + (9 * 64 * 128 + 128) + (9 * 128 * 128 + 128)
    assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == frozen
    with pytest.raises(ValueError, match="freeze_blocks"):
        backbones.get("vgg16", freeze_blocks=6)


# ----------------------------------------------------------------------------- ZF-5

def test_zf5_sizes_follow_zeiler_fergus_figure_3():
    model = backbones.get("zf", input_shape=(224, 224, 3))
    assert model.strides == {"conv5": 16}
    layers = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5")
    probe = keras.Model(model.input, [model.get_layer(n).output for n in layers])
    # ZF paper Fig. 3 / SPP-net Table 1: 110 after conv1, 55 after pool1, 26 after conv2, then 13.
    expected = {"conv1": (110, 96), "pool1": (55, 96), "conv2": (26, 256), "pool2": (13, 256),
                "conv3": (13, 384), "conv4": (13, 384), "conv5": (13, 256)}
    for name, tensor in zip(layers, probe.outputs):
        assert tuple(tensor.shape[1:]) == (expected[name][0],) * 2 + (expected[name][1],), name
    params = (7 * 7 * 3 * 96 + 96) + (5 * 5 * 96 * 256 + 256) + (9 * 256 * 384 + 384) + (9 * 384 * 384 + 384) \
        + (9 * 384 * 256 + 256)
    assert model.count_params() == params


def test_zf5_ceil_mode_pool_and_lrn_match_numpy():
    rng = np.random.default_rng(11)
    model = backbones.get("zf", input_normalization=None)
    probe = keras.Model(model.input, [model.get_layer(n).output for n in ("conv1", "pool1", "norm1")])
    x = rng.uniform(0, 1, (1, 61, 70, 3)).astype(np.float32)
    conv1, pool1, norm1 = (t.numpy() for t in probe(x))
    # Ceil mode: enough -inf padding at the bottom/right for the last partial window.
    h, w = (caffe_ceil_out_size(n, 3, 2) for n in conv1.shape[1:3])
    padded = np.pad(conv1, ((0, 0), (0, 2 * h + 1 - conv1.shape[1]), (0, 2 * w + 1 - conv1.shape[2]), (0, 0)),
                    constant_values=-np.inf)
    expected_pool = np_maxpool(padded, 3, 2)
    assert expected_pool.shape == pool1.shape
    np.testing.assert_allclose(pool1, expected_pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm1, np_lrn(expected_pool, 5, 1e-4, 0.75, 1.0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="minimum"):
        backbones.get("zf", input_shape=(32, 64, 3))


# ----------------------------------------------------------------------------- OverFeat

# Seed 001 Table 1 (fast) and Table 3 (accurate), transcribed row by row:
# channels, filter size, conv stride, pooling size (= pooling stride), zero padding, spatial input size.
OVERFEAT_TABLES = {
    "fast": dict(
        channels=(96, 256, 512, 1024, 1024, 3072, 4096, 1000), filters=(11, 5, 3, 3, 3), strides=(4, 1, 1, 1, 1),
        pools=(2, 2, None, None, 2), pads=(0, 0, 1, 1, 1), spatial_input=(231, 24, 12, 12, 12, 6, 1, 1)),
    "accurate": dict(
        channels=(96, 256, 512, 512, 1024, 1024, 4096, 4096, 1000), filters=(7, 7, 3, 3, 3, 3),
        strides=(2, 1, 1, 1, 1, 1), pools=(3, 2, None, None, None, 3), pads=(0, 0, 1, 1, 1, 1),
        spatial_input=(221, 36, 15, 15, 15, 15, 5, 1, 1)),
}
OVERFEAT_TABLE4_MILLIONS = {"fast": 145, "accurate": 144}


@pytest.fixture(scope="module")
def overfeat_models():
    return {variant: backbones.get(f"overfeat_{variant}") for variant in ("fast", "accurate")}


def layer_output_shapes(model, names, input_size):
    """Output shapes of the named layers for a square input of ``input_size`` pixels."""
    probe = keras.Model(model.input, {n: model.get_layer(n).output for n in names})
    specs = probe.compute_output_spec(keras.KerasTensor((1, input_size, input_size, 3)))
    return {n: tuple(spec.shape) for n, spec in specs.items()}


@pytest.mark.parametrize("variant", ["fast", "accurate"])
def test_overfeat_layers_match_paper_table(variant, overfeat_models):
    table = OVERFEAT_TABLES[variant]
    model = overfeat_models[variant]
    num_convs = len(table["filters"])
    layer_names = [layer.name for layer in model.layers]
    fc_names = [f"fc{num_convs + 1 + j}" for j in range(len(table["channels"]) - num_convs)]
    probed = [f"conv{i + 1}" for i in range(num_convs)] + [f"pool{i + 1}" for i in range(num_convs)
                                                           if table["pools"][i]] + fc_names
    shapes = layer_output_shapes(model, probed, table["spatial_input"][0])
    for i in range(num_convs):
        conv = model.get_layer(f"conv{i + 1}")
        assert conv.kernel_size == (table["filters"][i],) * 2 and conv.strides == (table["strides"][i],) * 2
        assert conv.filters == table["channels"][i]
        pad_name = f"conv{i + 1}_pad"
        assert (pad_name in layer_names) == bool(table["pads"][i])
        if table["pads"][i]:
            assert model.get_layer(pad_name).padding == ((table["pads"][i],) * 2,) * 2
        # The size a layer hands to the next one is the next layer's "spatial input size"; for the fast
        # model's layer 2 the table gives the size after its convolution (see kerasdet.backbones.overfeat).
        after_conv = shapes[f"conv{i + 1}"]
        if table["pools"][i]:
            pool = model.get_layer(f"pool{i + 1}")
            assert pool.pool_size == (table["pools"][i],) * 2 and pool.strides == (table["pools"][i],) * 2
            handed_on = shapes[f"pool{i + 1}"]
        else:
            handed_on = after_conv
        if variant == "fast" and i == 0:
            # Layer 2's table entry (24) is its conv output, so layer 1's output is derived from its
            # own row instead: (231 - 11) / 4 + 1 = 56, pooled 2x2/2 -> 28.
            n = (table["spatial_input"][0] - table["filters"][0]) // table["strides"][0] + 1
            assert handed_on[1:3] == (n // table["pools"][0],) * 2
        elif variant == "fast" and i == 1:
            assert after_conv[1:3] == (table["spatial_input"][1],) * 2
            assert handed_on[1:3] == (table["spatial_input"][2],) * 2
        else:
            assert handed_on[1:3] == (table["spatial_input"][i + 1],) * 2, f"layer {i + 1}"
        assert handed_on[3] == table["channels"][i]
    for j, name in enumerate(fc_names):
        layer_number = num_convs + 1 + j
        fc = model.get_layer(name)
        assert fc.filters == table["channels"][layer_number - 1]
        assert shapes[name] == (1, 1, 1, table["channels"][layer_number - 1])
        # A fully connected layer as a convolution spans its whole spatial input.
        assert fc.kernel_size == (table["spatial_input"][layer_number - 1],) * 2


@pytest.mark.parametrize("variant", ["fast", "accurate"])
def test_overfeat_parameter_count_matches_table_4(variant, overfeat_models):
    table = OVERFEAT_TABLES[variant]
    expected, in_ch = 0, 3
    for ch, k in zip(table["channels"], table["filters"]):
        expected += k * k * in_ch * ch + ch
        in_ch = ch
    num_convs = len(table["filters"])
    for j, ch in enumerate(table["channels"][num_convs:]):
        k = table["spatial_input"][num_convs + j]
        expected += k * k * in_ch * ch + ch
        in_ch = ch
    count = overfeat_models[variant].count_params()
    assert count == expected
    assert count // 1_000_000 == OVERFEAT_TABLE4_MILLIONS[variant]


def test_overfeat_fast_classifier_slides_over_larger_images(overfeat_models):
    model = overfeat_models["fast"]
    assert model.strides["logits"] == 32
    rng = np.random.default_rng(12)
    # 231 + 32 pixels: one more classifier window in each direction (Fig. 5 of the paper).
    image = rng.uniform(0, 1, (1, 231 + 32, 231 + 32, 3)).astype(np.float32)
    out = model(image)
    pooled, scores = out["pooled"].numpy()[0], out["logits"].numpy()[0]
    assert pooled.shape == (7, 7, 1024) and scores.shape == (2, 2, 1000)
    # The fully connected layers applied to each 6x6 window of layer 5, as plain matrix products
    # (float32: a float64 copy of fc6's 113M weights would cost more than the whole test).
    w6, b6 = model.get_layer("fc6").get_weights()
    w7, b7 = model.get_layer("fc7").get_weights()
    w8, b8 = model.get_layer("fc8").get_weights()
    windows = np.stack([pooled[r:r + 6, c:c + 6].reshape(-1) for r in range(2) for c in range(2)])
    h = np.maximum(windows @ w6.reshape(-1, 3072) + b6, 0)
    h = np.maximum(h @ w7.reshape(3072, 4096) + b7, 0)
    expected = (h @ w8.reshape(4096, 1000) + b8).reshape(2, 2, 1000)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4)


def test_overfeat_accurate_multiscale_sizes_match_table_5():
    model = backbones.get("overfeat_accurate", include_top=False)
    assert model.strides == {"features": 12, "pooled": 36}
    # Table 5: input size -> unpooled layer-5 map. Scale 5 (425x497) is left out: 497 gives 38 columns,
    # not the table's 35, by the same Table 3 arithmetic that reproduces every other row.
    table5 = {(245, 245): (17, 17), (281, 317): (20, 23), (317, 389): (23, 29), (389, 461): (29, 35),
              (461, 569): (35, 44)}
    for (h, w), expected in table5.items():
        features = model.compute_output_spec(keras.KerasTensor((1, h, w, 3)))["features"]
        assert tuple(features.shape[1:3]) == expected, (h, w)
        assert features.shape[3] == 1024


def test_more_backbones_config_round_trip_and_registry():
    for name in ("resnet50", "resnet101", "vgg16", "vgg16_reduced", "vgg16_refinedet", "zf", "overfeat_fast", "overfeat_accurate",
                 "tiny"):
        assert name in backbones.list()
    for model in (backbones.get("vgg16_reduced"), backbones.get("zf"),
                  backbones.get("overfeat_accurate", include_top=False, input_normalization="torchvision")):
        clone = type(model).from_config(model.get_config())
        assert clone.get_config() == model.get_config()
        assert clone.strides == model.strides
        assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
    with pytest.raises(ValueError, match="variant"):
        backbones.OverFeat(variant="slow")
    with pytest.raises(ValueError, match="minimum"):
        backbones.get("overfeat_fast", input_shape=(200, 200, 3))


def test_normalization_layers_save_and_load_in_keras_format(tmp_path):
    rng = np.random.default_rng(14)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(5, 3, padding="same")(inputs)
    x = FrozenBatchNormalization(name="frozen_bn")(x)
    x = LocalResponseNormalization(size=3, alpha=1e-2, name="lrn")(x)
    model = keras.Model(inputs, x)
    model.get_layer("frozen_bn").set_weights([rng.uniform(0.5, 1.5, 5), rng.normal(size=5), rng.normal(size=5),
                                              rng.uniform(0.5, 2.0, 5)])
    data = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    path = tmp_path / "norm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("frozen_bn"), FrozenBatchNormalization)
    assert loaded.get_layer("frozen_bn").trainable_weights == []
    assert isinstance(loaded.get_layer("lrn"), LocalResponseNormalization)
    np.testing.assert_allclose(loaded(data).numpy(), model(data).numpy(), rtol=1e-6, atol=1e-6)


def test_l2_normalization_matches_numpy_and_gradient():
    rng = np.random.default_rng(16)
    layer = L2Normalization(scale=10.0)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    layer.build(x.shape)
    gamma = rng.uniform(5, 15, 5)
    np.testing.assert_allclose(layer.gamma.numpy(), np.full(5, 10.0))
    layer.set_weights([gamma])
    norm = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=-1, keepdims=True))
    np.testing.assert_allclose(layer(x).numpy(), gamma * x / norm, rtol=1e-5, atol=1e-5)
    assert len(layer.trainable_weights) == 1
    small = tf.constant(rng.normal(size=(1, 2, 2, 3)), tf.float64)
    theoretical, numerical = tf.test.compute_gradient(lambda t: layer.__class__(2.0)(tf.cast(t, tf.float32)),
                                                      [small])
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-2)
    clone = L2Normalization.from_config(layer.get_config())
    assert clone.scale == 10.0 and clone.epsilon == layer.epsilon
    with pytest.raises(ValueError, match="scale"):
        L2Normalization(scale=0)
