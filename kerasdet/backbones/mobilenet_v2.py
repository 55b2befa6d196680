"""MobileNetV2 (Sandler et al. 2018), width 1.0, in the torchvision layout, channels-last.

Layout (torchvision `mobilenet_v2()`), every conv bias-free and followed by BatchNorm:
  features.0      3x3/2 conv 32 -> BN -> ReLU6
  features.1..17  inverted residual blocks, settings (t, c, n, s) per group of n blocks:
                  (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1); the first block of a group carries the stride s.
                  A block is [1x1 expand conv to t * in -> BN -> ReLU6] (only when t != 1) ->
                  3x3 depthwise conv (stride) -> BN -> ReLU6 -> 1x1 linear projection to c -> BN,
                  plus the input when stride 1 and in == out.
  features.18     1x1 conv 1280 -> BN -> ReLU6
  classifier      global average pooling -> Dropout(0.2) -> Linear(1280, num_classes) ("logits",
                  only with ``include_top``).
Feature outputs: "C2" = features.3 (stride 4, 24 channels), "C3" = features.6 (8, 32),
"C4" = features.13 (16, 96), "C5" = features.18 (32, 1280).
Padding is explicit (`ZeroPadding2D` + "valid") for the stride-2 3x3 convs, because Keras "same"
pads only bottom/right there while PyTorch pads 1 on every side: with explicit padding the outputs
equal torchvision's for any input size, odd ones included. Stride-1 3x3 convs use "same", which is
symmetric for an odd kernel.

Checkpoint name mapping (torchvision state-dict key -> Keras layer / weight), one rule:
  the module path with "." replaced by "_" is the Keras layer name (no path segment of this model
  contains "_", so the rule also runs backwards). torchvision's InvertedResidual numbers its
  `conv` Sequential from 0 whether or not the expand conv exists, so the t = 1 block (features.1)
  and the t = 6 blocks index differently:
    features.0.0.weight                  -> features_0_0/kernel             (stem conv)
    features.0.1.{weight,bias,running_mean,running_var}
                                         -> features_0_1/{gamma,beta,moving_mean,moving_variance}
    features.1.conv.0.0.weight           -> features_1_conv_0_0/kernel      (depthwise, t = 1)
    features.1.conv.0.1.*                -> features_1_conv_0_1/*           (its BN)
    features.1.conv.1.weight             -> features_1_conv_1/kernel        (projection)
    features.1.conv.2.*                  -> features_1_conv_2/*             (its BN)
    features.k.conv.0.0 / .0.1           -> features_k_conv_0_0 / _0_1      (expand conv / BN, k >= 2)
    features.k.conv.1.0 / .1.1           -> features_k_conv_1_0 / _1_1      (depthwise / BN)
    features.k.conv.2 / .3               -> features_k_conv_2 / _3          (projection / BN)
    features.18.0.weight, features.18.1.* -> features_18_0/kernel, features_18_1/*
    classifier.1.{weight,bias}           -> classifier_1/{kernel,bias}
  Conv kernels transpose from [out, in, kh, kw] to [kh, kw, in, out], depthwise kernels from
  [C, 1, kh, kw] to [kh, kw, C, 1], the Linear weight from [out, in] to [in, out];
  `num_batches_tracked` has no counterpart. Layers without weights (paddings, ReLU6s, adds, the
  pooling and the dropout) have names that no state-dict key produces.
`kerasdet.converters.mobilenet_v2` implements this rule.

``freeze_at`` follows ResNet's rule by output level: the k leading "stages" are made non-trainable,
where stage 0 = features.0 (the stem), stage 1 = features.1..3 (ends at C2), stage 2 = features.4..6
(C3), stage 3 = features.7..13 (C4), stage 4 = features.14..18 (C5). So freeze_at=0 freezes nothing,
1 the stem, 2 everything up to C2 (default, as ResNet's), ..., 5 every feature layer; the classifier
is never frozen.
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer
from kerasdet.layers.normalization import FrozenBatchNormalization

# (expand ratio t, output channels c, blocks n, first stride s) of features.1..17, from the paper's
# Table 2 as torchvision builds it.
INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                              (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# features index whose output is each detection level, and that level's total stride.
FEATURE_OUTPUTS = {"C2": (3, 4), "C3": (6, 8), "C4": (13, 16), "C5": (18, 32)}
# Freezable stage of each features index (see the module docstring): stage k ends at output level C(k+1).
_STAGE_ENDS = (0, 3, 6, 13, 18)
BN_EPSILON = 1e-5
# PyTorch's BN momentum 0.1 weighs the new batch; Keras' momentum weighs the running value.
BN_MOMENTUM = 0.9
DROPOUT_RATE = 0.2


def _conv_initializer():
    # torchvision initializes convs with kaiming_normal_(mode="fan_out").
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _depthwise_initializer():
    # PyTorch's fan_out of a depthwise weight [C, 1, k, k] is C * k * k; Keras computes fan_out of a
    # depthwise kernel [k, k, C, 1] as k * k and its fan_in as C * k * k, so "fan_in" gives PyTorch's value.
    return keras.initializers.VarianceScaling(2.0, mode="fan_in", distribution="untruncated_normal")


def _norm(x, name, frozen_bn):
    cls = FrozenBatchNormalization if frozen_bn else keras.layers.BatchNormalization
    return cls(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)(x)


def _relu6(x, name):
    return keras.layers.ReLU(max_value=6.0, name=name)(x)


def _pad_for(x, kernel_size, stride, name):
    """PyTorch's symmetric padding kernel_size // 2 -> (input, Keras padding mode)."""
    if stride > 1 and kernel_size > 1:
        return keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x), "valid"
    # Stride 1 with an odd kernel: "same" already pads symmetrically.
    return x, "same"


def _conv(x, filters, kernel_size, stride, name):
    x, padding = _pad_for(x, kernel_size, stride, name)
    return keras.layers.Conv2D(filters, kernel_size, strides=stride, padding=padding, use_bias=False,
                               kernel_initializer=_conv_initializer(), name=name)(x)


def _depthwise(x, stride, name):
    x, padding = _pad_for(x, 3, stride, name)
    return keras.layers.DepthwiseConv2D(3, strides=stride, padding=padding, use_bias=False,
                                        depthwise_initializer=_depthwise_initializer(), name=name)(x)


def inverted_residual(x, index, out_channels, stride, expand_ratio, frozen_bn):
    """torchvision ``features.{index}`` (an InvertedResidual); layer names follow its module paths."""
    in_channels = x.shape[-1]
    prefix = f"features_{index}_conv"
    y = x
    # Sequential index of the depthwise Conv2dNormActivation: 1 after an expand conv, else 0.
    dw = 0
    if expand_ratio != 1:
        y = _conv(y, int(round(in_channels * expand_ratio)), 1, 1, f"{prefix}_0_0")
        y = _norm(y, f"{prefix}_0_1", frozen_bn)
        y = _relu6(y, f"{prefix}_0_2")
        dw = 1
    y = _depthwise(y, stride, f"{prefix}_{dw}_0")
    y = _norm(y, f"{prefix}_{dw}_1", frozen_bn)
    y = _relu6(y, f"{prefix}_{dw}_2")
    y = _conv(y, out_channels, 1, 1, f"{prefix}_{dw + 1}")
    y = _norm(y, f"{prefix}_{dw + 2}", frozen_bn)
    if stride == 1 and in_channels == out_channels:
        y = keras.layers.Add(name=f"features_{index}_add")([x, y])
    return y


def _conv_bn_relu6(x, index, filters, kernel_size, stride, frozen_bn):
    """torchvision's Conv2dNormActivation at ``features.{index}`` (the stem and the last 1x1 conv)."""
    x = _conv(x, filters, kernel_size, stride, f"features_{index}_0")
    x = _norm(x, f"features_{index}_1", frozen_bn)
    return _relu6(x, f"features_{index}_2")


def _stage_of_layer(name):
    """Freezable stage of a layer (see the module docstring), or None outside ``features``."""
    parts = name.split("_")
    if len(parts) < 2 or parts[0] != "features" or not parts[1].isdigit():
        return None
    index = int(parts[1])
    return next(stage for stage, end in enumerate(_STAGE_ENDS) if index <= end)


@keras.saving.register_keras_serializable(package="kerasdet")
class MobileNetV2(Backbone):
    """MobileNetV2 (width 1.0) backbone with outputs "C2".."C5" (and "logits" with ``include_top``).

    Args:
        frozen_bn: use `FrozenBatchNormalization` everywhere (detection fine-tuning); otherwise
            ordinary BatchNormalization (eps 1e-5, Keras momentum 0.9 = PyTorch momentum 0.1).
        freeze_at: number of leading stages made non-trainable (module docstring): 0 = none,
            1 = features.0, 2 = up to C2 (default), 3 = up to C3, 4 = up to C4, 5 = all features.
        include_top: add global average pooling + Dropout(0.2) + "classifier_1" (``num_classes``
            logits) for ImageNet.
        num_classes: size of the classifier.
        input_shape: (H, W, 3); H and W may be None.
        input_normalization: "torchvision" (default, for torchvision checkpoints), "caffe" or None
            (the inputs then reach features.0 unchanged). Inputs are RGB 0..255.
    """

    def __init__(self, frozen_bn=True, freeze_at=2, include_top=False, num_classes=1000,
                 input_shape=(None, None, 3), input_normalization="torchvision", name=None, **kwargs):
        if isinstance(freeze_at, bool) or not isinstance(freeze_at, int) or not 0 <= freeze_at <= 5:
            raise ValueError(f"MobileNetV2: `freeze_at` must be an int in [0, 5], got {freeze_at!r}")
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"MobileNetV2: `num_classes` must be a positive integer, got {num_classes!r}")
        input_shape = check_input_shape(input_shape, "MobileNetV2")

        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)
        x = _conv_bn_relu6(x, 0, STEM_CHANNELS, 3, 2, frozen_bn)
        level_of_index = {index: level for level, (index, _) in FEATURE_OUTPUTS.items()}
        outputs = {}
        index = 1
        for expand_ratio, channels, blocks, stride in INVERTED_RESIDUAL_SETTINGS:
            for i in range(blocks):
                x = inverted_residual(x, index, channels, stride if i == 0 else 1, expand_ratio, frozen_bn)
                if index in level_of_index:
                    outputs[level_of_index[index]] = x
                index += 1
        x = _conv_bn_relu6(x, index, LAST_CHANNELS, 1, 1, frozen_bn)
        outputs[level_of_index[index]] = x
        strides = {level: stride for level, (_, stride) in FEATURE_OUTPUTS.items()}
        if include_top:
            pooled = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
            pooled = keras.layers.Dropout(DROPOUT_RATE, name="classifier_0")(pooled)
            # torchvision: normal_(0, 0.01) weights, zero bias.
            outputs["logits"] = keras.layers.Dense(
                num_classes, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),
                name="classifier_1")(pooled)

        super().__init__(inputs=inputs, outputs=outputs, strides=strides, name=name or "mobilenet_v2", **kwargs)
        self.frozen_bn = bool(frozen_bn)
        self.freeze_at = freeze_at
        self.include_top = bool(include_top)
        self.num_classes = int(num_classes)
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization
        self.freeze_stages(_stage_of_layer, freeze_at)

    def get_config(self):
        return {
            "frozen_bn": self.frozen_bn, "freeze_at": self.freeze_at, "include_top": self.include_top,
            "num_classes": self.num_classes, "input_shape": list(self._input_shape_arg),
            "input_normalization": self.input_normalization, "name": self.name,
        }


def mobilenet_v2(**kwargs):
    """MobileNetV2 backbone; keyword arguments as `MobileNetV2`."""
    return MobileNetV2(**kwargs)
