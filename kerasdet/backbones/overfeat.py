"""OverFeat "fast" and "accurate" networks (Sermanet et al., "OverFeat: Integrated Recognition,
Localization and Detection using Convolutional Networks", ICLR 2014), Tables 1 and 3.

Fast model (Table 1, training input 231x231):
    layer  1: conv  96 11x11/4            -> max 2x2/2      231 -> 56 -> 28
    layer  2: conv 256  5x5/1             -> max 2x2/2       28 -> 24 -> 12
    layer  3: conv 512  3x3/1, zero pad 1                    12
    layer  4: conv 1024 3x3/1, zero pad 1                    12
    layer  5: conv 1024 3x3/1, zero pad 1 -> max 2x2/2       12 -> 6
    layer  6: full 3072 = conv 6x6 over the 6x6 layer-5 map   1
    layer  7: full 4096 = conv 1x1                            1
    layer  8: full 1000 = conv 1x1                            1
Accurate model (Table 3, training input 221x221):
    layer  1: conv  96 7x7/2              -> max 3x3/3     221 -> 108 -> 36
    layer  2: conv 256 7x7/1              -> max 2x2/2      36 -> 30 -> 15
    layers 3-5: conv 512, 512, 1024 3x3/1, zero pad 1       15
    layer  6: conv 1024 3x3/1, zero pad 1 -> max 3x3/3      15 -> 5
    layer  7: full 4096 = conv 5x5                           1
    layer  8: full 4096 = conv 1x1                           1
    layer  9: full 1000 = conv 1x1                           1
The table's "spatial input size" of each layer is the output size of the layer before, except for
layer 2 of the fast model, where the table's 24x24 is the size after layer 2's convolution (its input
is 28x28 = 56 / 2; only this reading fits 231 -> 11x11/4 -> 56). Pools are non-overlapping and round
down; there is no contrast normalization (paper sec. 3.1). ReLU follows every conv and the first two
fully connected layers, with dropout on those two.

The fully connected layers are convolutions, as the paper runs them at test time (sec. 3.5), so a
larger image gives a spatial map of class scores: one output per 32 input pixels (fast) or 36
(accurate), the total subsampling 4x2x2x2 and 2x3x2x3.
Layer names: conv1..conv5 / pool1, pool2, pool5 (fast), conv1..conv6 / pool1, pool2, pool6 (accurate),
fc6..fc8 (fast) / fc7..fc9 (accurate) after the paper's layer numbers.
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer

# (channels, kernel, stride, zero padding, pool size (= pool stride) or None) of the conv layers.
OVERFEAT_CONVS = {
    "fast": ((96, 11, 4, 0, 2), (256, 5, 1, 0, 2), (512, 3, 1, 1, None), (1024, 3, 1, 1, None),
             (1024, 3, 1, 1, 2)),
    "accurate": ((96, 7, 2, 0, 3), (256, 7, 1, 0, 2), (512, 3, 1, 1, None), (512, 3, 1, 1, None),
                 (1024, 3, 1, 1, None), (1024, 3, 1, 1, 3)),
    # Not in the paper: a small network with the accurate model's structure where it matters for
    # the fine stride (last pool 3x3/3 on an unpooled top map, a fixed-size classifier input) so the
    # OverFeat detector's tests and synthetic zoo entries train on CPU. Features stride 4, pooled 12.
    "tiny": ((16, 3, 1, 1, 2), (32, 3, 1, 1, 2), (64, 3, 1, 1, None), (64, 3, 1, 1, 3)),
}
# (channels, kernel) of the fully connected layers as convolutions; the last one is the classifier.
OVERFEAT_FULL = {
    "fast": ((3072, 6), (4096, 1), (1000, 1)),
    "accurate": ((4096, 5), (4096, 1), (1000, 1)),
    "tiny": ((128, 4), (128, 1), (1000, 1)),
}
# The input that gives a 1x1 classifier output: the window one classifier output looks at.
TRAINING_INPUT_SIZE = {"fast": 231, "accurate": 221, "tiny": 48}


def _total_stride(variant, pooled):
    stride = 1
    for _, _, conv_stride, _, pool in OVERFEAT_CONVS[variant]:
        stride *= conv_stride * (pool or 1)
    if not pooled:
        stride //= OVERFEAT_CONVS[variant][-1][4]
    return stride


@keras.saving.register_keras_serializable(package="kerasdet")
class OverFeat(Backbone):
    """OverFeat fast / accurate (see the module docstring).

    Outputs: "features" = the top conv layer before its pooling (conv5 fast, conv6 accurate; the
    "unpooled layer 5" map that the paper pools at 3x3 offsets for fine-stride classification),
    "pooled" = after the pooling, and with ``include_top`` "logits", the spatial class-score map.

    Args:
        variant: "fast", "accurate" or "tiny" (not in the paper; for tests and synthetic data).
        include_top: add the fully connected layers as convolutions.
        num_classes: channels of the last layer (1000 in the paper).
        dropout: rate after the first two fully connected layers.
        input_shape: (H, W, 3); H and W may be None.
        input_normalization: None (default), "torchvision" or "caffe".
    """

    def __init__(self, variant="fast", include_top=True, num_classes=1000, dropout=0.5,
                 input_shape=(None, None, 3), input_normalization=None, name=None, **kwargs):
        if variant not in OVERFEAT_CONVS:
            raise ValueError(f"OverFeat: `variant` must be one of {sorted(OVERFEAT_CONVS)}, got {variant!r}")
        input_shape = check_input_shape(input_shape, f"OverFeat-{variant}",
                                        min_size=TRAINING_INPUT_SIZE[variant] if include_top else None)
        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)
        convs = OVERFEAT_CONVS[variant]
        outputs = {}
        for i, (filters, kernel, stride, pad, pool) in enumerate(convs, 1):
            if pad:
                x = keras.layers.ZeroPadding2D(pad, name=f"conv{i}_pad")(x)
            x = keras.layers.Conv2D(filters, kernel, strides=stride, activation="relu", name=f"conv{i}")(x)
            if i == len(convs):
                outputs["features"] = x
            if pool:
                x = keras.layers.MaxPooling2D(pool, strides=pool, padding="valid", name=f"pool{i}")(x)
        outputs["pooled"] = x
        strides = {"features": _total_stride(variant, pooled=False), "pooled": _total_stride(variant, pooled=True)}
        if include_top:
            full = OVERFEAT_FULL[variant]
            for j, (filters, kernel) in enumerate(full):
                layer_number = len(convs) + 1 + j
                last = j == len(full) - 1
                x = keras.layers.Conv2D(num_classes if last else filters, kernel,
                                        activation=None if last else "relu", name=f"fc{layer_number}")(x)
                if not last:
                    x = keras.layers.Dropout(dropout, name=f"drop{layer_number}")(x)
            outputs["logits"] = x
            strides["logits"] = strides["pooled"]
        super().__init__(inputs=inputs, outputs=outputs, strides=strides, name=name or f"overfeat_{variant}",
                         **kwargs)
        self.variant = variant
        self.include_top = bool(include_top)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization

    def get_config(self):
        return {"variant": self.variant, "include_top": self.include_top, "num_classes": self.num_classes,
                "dropout": self.dropout, "input_shape": list(self._input_shape_arg),
                "input_normalization": self.input_normalization, "name": self.name}


def overfeat_fast(**kwargs):
    """OverFeat fast model (seed 001 Table 1)."""
    return OverFeat(variant="fast", **kwargs)


def overfeat_accurate(**kwargs):
    """OverFeat accurate model (seed 001 Table 3)."""
    return OverFeat(variant="accurate", **kwargs)
