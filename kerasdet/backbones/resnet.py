"""ResNet-50 / ResNet-101 (He et al. 2016) in the torchvision layout, channels-last.

Layout (torchvision `resnet50` / `resnet101`, i.e. "ResNet v1.5"):
  stem: conv1 7x7/2 (no bias, padding 3) -> bn1 -> relu -> maxpool 3x3/2 (padding 1)
  layer1..layer4: [3, 4, 6, 3] (ResNet-50) or [3, 4, 23, 3] (ResNet-101) bottleneck blocks of
  1x1 (planes) -> 3x3 (planes, carries the stride) -> 1x1 (4 * planes), planes = 64, 128, 256, 512;
  the first block of each stage has a projection shortcut "downsample" = 1x1 conv (stride) + BN.
  Strides of the stage outputs C2, C3, C4, C5: 4, 8, 16, 32.
Padding is explicit (`ZeroPadding2D` + "valid") wherever a strided conv or pool pads, because
Keras "same" pads only bottom/right for stride 2 while PyTorch pads both sides: with explicit
padding, output sizes and values equal PyTorch's for any input size.

Checkpoint name mapping (torchvision state-dict key -> Keras layer / weight), one rule:
  the module path with "." replaced by "_" is the Keras layer name, e.g.
    conv1.weight                       -> conv1/kernel
    bn1.{weight,bias,running_mean,running_var} -> bn1/{gamma,beta,moving_mean,moving_variance}
    layer1.0.conv1.weight              -> layer1_0_conv1/kernel
    layer1.0.bn1.running_var           -> layer1_0_bn1/moving_variance
    layer1.0.downsample.0.weight       -> layer1_0_downsample_0/kernel
    layer1.0.downsample.1.weight       -> layer1_0_downsample_1/gamma
    fc.{weight,bias}                   -> fc/{kernel,bias}
  Conv kernels transpose from PyTorch [out, in, kh, kw] to Keras [kh, kw, in, out]
  (numpy `transpose(2, 3, 1, 0)`), the fc weight from [1000, 2048] to [2048, 1000];
  `num_batches_tracked` has no counterpart and is dropped. Layers without weights (paddings, relus,
  adds) have names that no state-dict key produces.

`load_torchvision_weights(model, state_dict)` applies this rule to a state dict of numpy arrays.

Faster R-CNN "C4" (He et al. 2016 sec. on detection; Detectron's ResNet-C4): the trunk stops after
layer3 (`ResNet(include_c5=False)`, outputs C2..C4, stride 16); RoIs are pooled from C4 to 14x14 and
`ResNetConv5Head` applies layer4 to each RoI with stride 2 in its first block (14x14 -> 7x7), followed
by global average pooling in the box head. Its layers carry the same `layer4_*` names, so the same
torchvision checkpoint fills both parts.
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer
from kerasdet.backbones.norm_folding import FoldsFrozenNorms
from kerasdet.layers.deform_layers import DeformConv2D
from kerasdet.layers.normalization import FrozenBatchNormalization
from kerasdet.layers.pointwise import PointwiseConv2D
from kerasdet.layers.winograd import WinogradConv2D

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
BN_EPSILON = 1e-5
# PyTorch's BN momentum 0.1 weighs the new batch; Keras' momentum weighs the running value.
BN_MOMENTUM = 0.9


def _conv_initializer():
    # torchvision initializes convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _norm(name, frozen_bn):
    if frozen_bn:
        return FrozenBatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _conv(x, filters, kernel_size, stride, name, initializer=None):
    """Bias-free conv with PyTorch's symmetric padding kernel_size // 2."""
    pad = kernel_size // 2
    if stride > 1 and pad > 0:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        # Stride 1 with an odd kernel: "same" already pads symmetrically.
        padding = "same"
    # 1x1: the same layer, with matrix-product gradients in bfloat16 training (kerasdet.layers.pointwise);
    # 3x3: Winograd products for stride-1 float32 on the CPU (kerasdet.layers.winograd).
    layer = {1: PointwiseConv2D, 3: WinogradConv2D}.get(kernel_size, keras.layers.Conv2D)
    return layer(filters, kernel_size, strides=stride, padding=padding, use_bias=False,
                 kernel_initializer=initializer or _conv_initializer(), name=name)(x)


def bottleneck_block(x, prefix, planes, stride, downsample, frozen_bn, deformable=None,
                     initializer=None):
    """One torchvision Bottleneck; ``prefix`` is e.g. "layer2_0". Returns the block output.

    ``deformable`` (None, 1 or 2) swaps the 3x3 conv for a `DeformConv2D` (DCN v1 / v2 with mask) of
    the same name, kernel shape and padding, as Deformable ConvNets do in the last stages.
    ``initializer``: the convs' kernel initializer (default torchvision's, `_conv_initializer`).
    """
    shortcut = x
    y = _conv(x, planes, 1, 1, f"{prefix}_conv1", initializer)
    y = _norm(f"{prefix}_bn1", frozen_bn)(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu1")(y)
    if deformable:
        y = DeformConv2D(planes, 3, strides=stride, padding=1, use_bias=False, use_mask=deformable == 2,
                         kernel_initializer=_conv_initializer(), name=f"{prefix}_conv2")(y)
    else:
        y = _conv(y, planes, 3, stride, f"{prefix}_conv2", initializer)
    y = _norm(f"{prefix}_bn2", frozen_bn)(y)
    y = keras.layers.ReLU(name=f"{prefix}_relu2")(y)
    y = _conv(y, planes * EXPANSION, 1, 1, f"{prefix}_conv3", initializer)
    y = _norm(f"{prefix}_bn3", frozen_bn)(y)
    if downsample:
        shortcut = PointwiseConv2D(planes * EXPANSION, strides=stride, use_bias=False,
                                   kernel_initializer=initializer or _conv_initializer(),
                                   name=f"{prefix}_downsample_0")(x)
        shortcut = _norm(f"{prefix}_downsample_1", frozen_bn)(shortcut)
    y = keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{prefix}_out")(y)


def resnet_stage(x, stage, num_blocks, stride, frozen_bn, deformable=None):
    """torchvision ``layer{stage}``: ``num_blocks`` bottlenecks, the first strided and projected."""
    planes = STAGE_PLANES[stage - 1]
    for i in range(num_blocks):
        x = bottleneck_block(x, f"layer{stage}_{i}", planes, stride if i == 0 else 1,
                             downsample=(i == 0), frozen_bn=frozen_bn, deformable=deformable)
    return x


def _check_deformable_version(version, owner):
    if version not in (1, 2):
        raise ValueError(f"{owner}: `deformable_version` must be 1 or 2, got {version!r}")


def _stage_of_layer(name):
    """Which freezable stage a layer belongs to: 0 = stem, k = layer{k}, None = neither."""
    if name in ("conv1", "bn1"):
        return 0
    for k in range(1, 5):
        if name.startswith(f"layer{k}_"):
            return k
    return None


@keras.saving.register_keras_serializable(package="kerasdet")
class ResNet(Backbone):
    """ResNet-50/101 backbone with outputs "C2".."C5" (and "logits" with ``include_top``).

    Args:
        depth: 50 or 101.
        frozen_bn: use `FrozenBatchNormalization` everywhere (detection fine-tuning); otherwise
            ordinary BatchNormalization (eps 1e-5, Keras momentum 0.9 = PyTorch momentum 0.1).
        freeze_at: number of leading stages made non-trainable, Detectron style: 0 = none,
            1 = stem (conv1, bn1), 2 = stem + layer1 (default), ..., 5 = everything.
        include_c5: False stops after layer3 (the Faster R-CNN C4 trunk, outputs C2..C4).
        include_top: add global average pooling + "fc" (``num_classes`` logits) for ImageNet.
        num_classes: size of the fc layer.
        input_shape: (H, W, 3); H and W may be None.
        input_normalization: "torchvision" (default, for torchvision checkpoints), "caffe" or None
            (the inputs are then fed to conv1 unchanged). Inputs are RGB 0..255.
        deformable_stages: output levels whose blocks get deformable 3x3 convs, e.g. (5,) for
            Deformable ConvNets v1 (res5) or (3, 4, 5) for v2 (C3..C5 = layer2..layer4). Their offset
            convs start at zero, so a torchvision checkpoint loads and the net starts as the plain one.
        deformable_version: 1 (offsets only) or 2 (offsets and modulation mask).
        extra_res6: append RefineDet's extra residual block "res6" (a bottleneck of 128, 128, 512
            channels with stride 2 and a projection shortcut) after C5, output "C6" at stride 64.
    """

    def __init__(self, depth=50, frozen_bn=True, freeze_at=2, include_c5=True, include_top=False,
                 num_classes=1000, input_shape=(None, None, 3), input_normalization="torchvision",
                 deformable_stages=(), deformable_version=1, extra_res6=False, name=None, **kwargs):
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet: `depth` must be one of {sorted(STAGE_BLOCKS)}, got {depth!r}")
        if not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
            raise ValueError(f"ResNet: `freeze_at` must be an int in [0, 5], got {freeze_at!r}")
        if include_top and not include_c5:
            raise ValueError("ResNet: `include_top=True` needs `include_c5=True` (the fc reads C5)")
        if extra_res6 and not include_c5:
            raise ValueError("ResNet: `extra_res6=True` needs `include_c5=True` (res6 reads C5)")
        if not include_c5 and freeze_at == 5:
            raise ValueError("ResNet: `freeze_at=5` freezes layer4, which `include_c5=False` omits")
        input_shape = check_input_shape(input_shape, "ResNet")
        deformable_stages = tuple(sorted(int(k) for k in deformable_stages))
        max_level = 5 if include_c5 else 4
        if any(k not in range(3, max_level + 1) for k in deformable_stages):
            raise ValueError(f"ResNet: `deformable_stages` must be levels in 3..{max_level}, got {deformable_stages}")
        if deformable_stages:
            _check_deformable_version(deformable_version, "ResNet")

        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)
        x = _conv(x, 64, 7, 2, "conv1")
        x = _norm("bn1", frozen_bn)(x)
        x = keras.layers.ReLU(name="relu")(x)
        # Zero padding is exact here: the input is post-ReLU (>= 0), so a zero never beats a real
        # value in a window, as PyTorch's implicit -inf padding never does.
        x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)

        outputs, strides = {}, {}
        num_stages = 4 if include_c5 else 3
        for stage in range(1, num_stages + 1):
            deformable = deformable_version if stage + 1 in deformable_stages else None
            x = resnet_stage(x, stage, STAGE_BLOCKS[depth][stage - 1], 1 if stage == 1 else 2, frozen_bn,
                             deformable=deformable)
            outputs[f"C{stage + 1}"] = x
            strides[f"C{stage + 1}"] = 2 ** (stage + 1)
        if extra_res6:
            # 128 planes x expansion 4 = 512 output channels, as RefineDet's res6; its convs start
            # from N(0, 0.01) as the reference model's new layers (no ImageNet weights exist for it).
            outputs["C6"] = bottleneck_block(x, "res6", 128, 2, downsample=True, frozen_bn=frozen_bn,
                                             initializer=keras.initializers.RandomNormal(0.0, 0.01))
            strides["C6"] = 64
        if include_top:
            pooled = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
            outputs["logits"] = keras.layers.Dense(num_classes, name="fc")(pooled)

        super().__init__(inputs=inputs, outputs=outputs, strides=strides,
                         name=name or f"resnet{depth}", **kwargs)
        self.depth = depth
        self.frozen_bn = bool(frozen_bn)
        self.freeze_at = freeze_at
        self.include_c5 = bool(include_c5)
        self.include_top = bool(include_top)
        self.num_classes = int(num_classes)
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization
        self.deformable_stages = deformable_stages
        self.deformable_version = int(deformable_version)
        self.extra_res6 = bool(extra_res6)
        self.freeze_stages(_stage_of_layer, freeze_at)

    def get_config(self):
        return {
            "depth": self.depth, "frozen_bn": self.frozen_bn, "freeze_at": self.freeze_at,
            "include_c5": self.include_c5, "include_top": self.include_top,
            "num_classes": self.num_classes, "input_shape": list(self._input_shape_arg),
            "input_normalization": self.input_normalization,
            "deformable_stages": list(self.deformable_stages), "deformable_version": self.deformable_version,
            "extra_res6": self.extra_res6, "name": self.name,
        }


@keras.saving.register_keras_serializable(package="kerasdet")
class ResNetConv5Head(FoldsFrozenNorms, keras.Model):
    """torchvision ``layer4`` as a per-RoI head for Faster R-CNN C4 (see the module docstring).

    Maps pooled RoI features [R, S, S, in_channels] (S = 14 in Detectron) to [R, S/2, S/2, 2048]
    with the stride on the 3x3 conv of the first block, or to [R, 2048] with ``global_pool``.

    Args:
        frozen_bn: FrozenBatchNormalization (default) or BatchNormalization.
        input_channels: channels of the pooled features (1024 for a ResNet C4 trunk).
        stride: stride of the first block (2 as in the paper / Detectron).
        global_pool: append global average pooling.
        deformable: None, 1 or 2: deformable 3x3 convs (DCN v1 / v2) in the three blocks.
    """

    def __init__(self, frozen_bn=True, input_channels=1024, stride=2, global_pool=False, deformable=None,
                 name=None, **kwargs):
        if stride not in (1, 2):
            raise ValueError(f"ResNetConv5Head: `stride` must be 1 or 2, got {stride!r}")
        if deformable is not None:
            _check_deformable_version(deformable, "ResNetConv5Head")
        inputs = keras.Input(shape=(None, None, int(input_channels)), name="roi_features")
        x = resnet_stage(inputs, 4, 3, stride, frozen_bn, deformable=deformable)
        if global_pool:
            x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
        super().__init__(inputs=inputs, outputs=x, name=name or "res5_head", **kwargs)
        self.frozen_bn = bool(frozen_bn)
        self.input_channels = int(input_channels)
        self.stride = stride
        self.global_pool = bool(global_pool)
        self.deformable = deformable

    def get_config(self):
        return {"frozen_bn": self.frozen_bn, "input_channels": self.input_channels, "stride": self.stride,
                "global_pool": self.global_pool, "deformable": self.deformable, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def resnet50(**kwargs):
    """ResNet-50 backbone; keyword arguments as `ResNet`."""
    return ResNet(depth=50, **kwargs)


def resnet101(**kwargs):
    """ResNet-101 backbone; keyword arguments as `ResNet`."""
    return ResNet(depth=101, **kwargs)


def resnet_c4(depth=50, frozen_bn=True, **kwargs):
    """The Faster R-CNN C4 split: (trunk up to layer3 with outputs C2..C4, `ResNetConv5Head`)."""
    trunk = ResNet(depth=depth, frozen_bn=frozen_bn, include_c5=False, **kwargs)
    return trunk, ResNetConv5Head(frozen_bn=frozen_bn)


_BN_PARAMS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def torchvision_key_to_keras(key):
    """Maps a torchvision ResNet state-dict key to (Keras layer name, weight name), or None.

    The rule of the module docstring: module path with "." -> "_"; BN parameters renamed to the
    Keras ones; conv / fc "weight" -> "kernel". ``num_batches_tracked`` has no counterpart (None).
    """
    module, _, param = key.rpartition(".")
    if not module or param == "num_batches_tracked":
        return None
    layer = module.replace(".", "_")
    leaf = module.split(".")[-1]
    is_bn = leaf.startswith("bn") or module.endswith("downsample.1")
    if is_bn:
        if param not in _BN_PARAMS:
            raise ValueError(f"torchvision key {key!r}: unknown BatchNorm parameter {param!r}")
        return layer, _BN_PARAMS[param]
    if param == "weight":
        return layer, "kernel"
    if param == "bias":
        return layer, "bias"
    raise ValueError(f"torchvision key {key!r}: unknown parameter {param!r}")


def load_torchvision_weights(model, state_dict):
    """Copies a torchvision ResNet state dict (a mapping key -> numpy array) into ``model``.

    ``model`` is a `ResNet` or a `ResNetConv5Head`; keys for layers the model lacks (e.g. ``fc`` when
    ``include_top=False``, or everything but layer4 for the head) are skipped. Parts with no
    torchvision counterpart keep their initialization: the offset convs of deformable blocks (zero)
    and the extra "res6" block. Conv kernels are
    transposed from [out, in, kh, kw] to [kh, kw, in, out] and the fc weight from [out, in] to
    [in, out]. Every weight of the model must receive a value; a missing key or a shape mismatch
    raises ValueError naming the key. Returns the list of keys that were used.
    """
    import numpy as np

    targets = {}
    for layer in model.layers:
        if _stage_of_layer(layer.name) is None and layer.name != "fc":
            continue
        for weight in layer.weights:
            # Only the layer's own weights: a DeformConv2D also lists its offset conv's "kernel".
            if weight.path.split("/")[-2] == layer.name:
                targets[(layer.name, weight.name)] = weight
    used, assigned = [], set()
    for key, value in state_dict.items():
        mapped = torchvision_key_to_keras(key)
        if mapped is None or mapped not in targets:
            continue
        value = np.asarray(value)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        weight = targets[mapped]
        if tuple(value.shape) != tuple(weight.shape):
            raise ValueError(f"torchvision key {key!r}: shape {tuple(value.shape)} after transposition does not "
                             f"match Keras weight {'/'.join(mapped)} of shape {tuple(weight.shape)}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"torchvision key {key!r}: contains NaN or infinite values")
        weight.assign(value.astype(weight.dtype))
        used.append(key)
        assigned.add(mapped)
    missing = sorted("/".join(m) for m in set(targets) - assigned)
    if missing:
        raise ValueError(f"load_torchvision_weights: no value for {len(missing)} weights of {model.name!r}, "
                         f"e.g. {missing[:5]}")
    return used
