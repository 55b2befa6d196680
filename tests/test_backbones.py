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
from kerasdet.layers.normalization import FrozenBatchNormalization, LocalResponseNormalization


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
    with pytest.raises(ValueError, match="std"):
        ImageNormalization((0, 0, 0), (1, 0, 1))


# ----------------------------------------------------------------------------- ResNet

def test_resnet_parameter_counts_match_torchvision():
    # Stem conv1 7x7x3x64 + bn1, four stages, fc 2048 -> 1000; the published totals are 23,508,032
    # (ResNet-50 without fc), 25,557,032 (with fc) and 44,549,160 (ResNet-101 with fc).
    def expected(blocks, fc):
        n = 7 * 7 * 3 * 64 + 2 * 64
        in_ch = 64
        for planes, b in zip((64, 128, 256, 512), blocks):
            n += stage_params(in_ch, planes, b)
            in_ch = 4 * planes
        return n + (2048 * 1000 + 1000 if fc else 0)

    r50 = ResNet(50, include_top=False)
    assert torch_param_count(r50) == expected((3, 4, 6, 3), False) == 23_508_032
    r50_top = ResNet(50, include_top=True)
    assert torch_param_count(r50_top) == expected((3, 4, 6, 3), True) == 25_557_032
    r101 = ResNet(101, include_top=True)
    assert torch_param_count(r101) == expected((3, 4, 23, 3), True) == 44_549_160


def test_resnet50_output_names_shapes_and_strides():
    model = ResNet(50, input_shape=(224, 224, 3), include_top=True)
    assert model.strides == {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    assert model.feature_names == ["C2", "C3", "C4", "C5"]
    shapes = {k: tuple(v.shape) for k, v in model.output.items()}
    assert shapes == {"C2": (None, 56, 56, 256), "C3": (None, 28, 28, 512), "C4": (None, 14, 14, 1024),
                      "C5": (None, 7, 7, 2048), "logits": (None, 1000)}


@pytest.mark.parametrize("height,width", [(64, 64), (97, 75)])
def test_resnet_sizes_follow_pytorch_symmetric_padding(height, width):
    model = ResNet(50)
    out = model(np.zeros((1, height, width, 3), np.float32))

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


def test_resnet_stem_matches_numpy():
    rng = np.random.default_rng(5)
    model = ResNet(50, frozen_bn=True)
    randomize_bn(model.get_layer("bn1"), rng)
    probe = keras.Model(model.input, [model.get_layer("conv1").output, model.get_layer("maxpool").output])
    x = rng.uniform(0, 255, (1, 37, 42, 3)).astype(np.float32)
    conv_out, pool_out = probe(x)
    normalized = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    kernel = model.get_layer("conv1").get_weights()[0]
    expected_conv = np_conv2d(normalized, kernel, stride=2, pad=3)
    np.testing.assert_allclose(conv_out.numpy(), expected_conv, rtol=1e-4, atol=1e-3)
    gamma, beta, mean, var = model.get_layer("bn1").get_weights()
    act = np.maximum(np_batchnorm(expected_conv, gamma, beta, mean, var, 1e-5), 0)
    np.testing.assert_allclose(pool_out.numpy(), np_maxpool(act, 3, 2, pad=1), rtol=1e-4, atol=1e-3)


def test_resnet_downsampling_bottleneck_matches_numpy():
    rng = np.random.default_rng(6)
    model = ResNet(50, frozen_bn=True, input_normalization=None)
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
def test_resnet_weights_map_one_to_one_to_torchvision_keys(depth, blocks):
    model = ResNet(depth, include_top=True)
    keras_paths = [w.path for w in model.weights]
    assert len(keras_paths) == len(set(keras_paths))
    assert sorted(keras_paths) == sorted(torch_key_to_keras(k) for k in torchvision_resnet_keys(blocks))


def _trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
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


def test_resnet_frozen_bn_keeps_only_conv_kernels_trainable():
    model = ResNet(50, frozen_bn=True, freeze_at=0)
    assert all(w.path.endswith("kernel") for w in model.trainable_weights)
    convs = 7 * 7 * 3 * 64
    in_ch = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            cin = in_ch if b == 0 else 4 * planes
            convs += cin * planes + 9 * planes * planes + planes * 4 * planes + (cin * 4 * planes if b == 0 else 0)
        in_ch = 4 * planes
    assert _trainable_params(model) == convs


def test_resnet_frozen_stage_batchnorm_does_not_update_statistics():
    model = ResNet(50, frozen_bn=False, freeze_at=2)
    frozen, live = model.get_layer("layer1_0_bn1"), model.get_layer("layer2_0_bn1")
    before = frozen.moving_mean.numpy().copy(), live.moving_mean.numpy().copy()
    model(np.random.default_rng(7).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32), training=True)
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), before[0])
    assert not np.allclose(live.moving_mean.numpy(), before[1])


def test_resnet_c4_split_and_conv5_head():
    trunk, head = resnet_c4(50)
    assert trunk.strides == {"C2": 4, "C3": 8, "C4": 16}
    assert not any(layer.name.startswith("layer4") for layer in trunk.layers)
    rois = np.random.default_rng(8).normal(size=(3, 14, 14, 1024)).astype(np.float32)
    assert tuple(head(rois).shape) == (3, 7, 7, 2048)
    assert torch_param_count(head) == stage_params(1024, 512, 3)
    full = {w.path for w in ResNet(50).weights if w.path.startswith("layer4")}
    assert {w.path for w in head.weights} == full
    pooled = ResNetConv5Head(global_pool=True)
    assert tuple(pooled(rois).shape) == (3, 2048)
    clone = ResNetConv5Head.from_config(pooled.get_config())
    assert clone.get_config() == pooled.get_config()


def test_resnet_config_round_trip_and_bad_arguments():
    model = ResNet(101, frozen_bn=False, freeze_at=3, input_normalization="caffe", name="r101")
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
    start = time.perf_counter()
    model = TinyBackbone()
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"TinyBackbone took {elapsed:.2f}s to build"
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
    c4 = backbones.get("resnet50_c4")
    assert c4.strides == {"C2": 4, "C3": 8, "C4": 16}
    with pytest.raises(KeyError, match="resnet18"):
        backbones.get("resnet18")


def test_backbone_runs_in_tf_function():
    model = TinyBackbone()

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def features(images):
        return model(images)

    out = features(tf.zeros((1, 50, 70, 3)))
    assert tuple(out["C5"].shape) == (1, 2, 3, 64)
