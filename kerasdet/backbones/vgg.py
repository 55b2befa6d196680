"""VGG-16 (Simonyan & Zisserman 2015, configuration D) and its SSD / RefineDet "reduced" variant.

VGG-16: 13 3x3 convs (stride 1, padding 1) in five blocks conv1_1..conv5_3 of 64, 128, 256, 512, 512
channels, each block followed by 2x2/2 max pooling pool1..pool5; the classifier fc6 (4096), fc7
(4096), fc8 (1000) reads the flattened 7x7x512 pool5 of a 224x224 input.
Layer names are the Caffe ones (conv1_1, pool1, fc6, ...), which the detection papers and their
Caffe checkpoints use. Pooling rounds up (Caffe's ceil mode, Keras "same" for 2x2/2): a 600-pixel
side gives 300, 150, 75, 38, the sizes of the Caffe Fast/Faster R-CNN models.

VGG-16 reduced (DeepLab-LargeFOV; Liu et al. SSD 2016; Zhang et al. RefineDet 2018, sec. 4
"Backbone Network"): fc6 and fc7 become convolutions, a dilated 3x3 conv_fc6 and a 1x1 conv_fc7, both
1024 channels (subsampled from the fc weights), followed by RefineDet's extra conv6_1 (1x1, 256) and
conv6_2 (3x3/2, padding 1, 512). Two styles differ in pool5 and the dilation:
  "ssd":       pool5 3x3/1 (padding 1), conv_fc6 dilation 6 -> conv4_3, conv5_3, fc7, conv6_2 at
               strides 8, 16, 16, 32 (SSD's fc7 layout);
  "refinedet": pool5 2x2/2, conv_fc6 dilation 3 -> strides 8, 16, 32, 64, the total strides the
               RefineDet paper gives for its four detection layers (40, 20, 10, 5 cells at 320x320,
               as in its reference Caffe model).
Outputs: "conv4_3", "conv5_3", "fc7" (the output of conv_fc7) and "conv6_2".
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer
from kerasdet.layers.winograd import WinogradConv2D

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# pool5 (size, stride) and conv_fc6 dilation of the reduced styles.
REDUCED_STYLES = {"ssd": (3, 1, 6), "refinedet": (2, 2, 3)}


def _conv(x, filters, kernel_size, name, strides=1, dilation_rate=1, padding="same"):
    layer = WinogradConv2D if kernel_size == 3 else keras.layers.Conv2D  # see kerasdet.layers.winograd
    return layer(filters, kernel_size, strides=strides, dilation_rate=dilation_rate,
                 padding=padding, activation="relu", name=name)(x)


@keras.saving.register_keras_serializable(package="kerasdet")
class VGG16(Backbone):
    """VGG-16 backbone, plain or reduced (see the module docstring).

    Outputs, plain: "conv4_3" (stride 8), "conv5_3" (16), "pool5" (32); with ``include_top`` also
    "fc7" (4096 features) and "logits". Reduced: "conv4_3", "conv5_3", "fc7", "conv6_2".

    Args:
        reduced: build the SSD / RefineDet variant (dilated conv_fc6, conv_fc7, conv6_1, conv6_2).
        reduced_style: "ssd" (pool5 3x3/1, dilation 6) or "refinedet" (pool5 2x2/2, dilation 3).
        include_top: plain VGG-16 only: flatten + fc6, fc7 (with dropout) + fc8; needs a 224x224 input.
        num_classes: fc8 size.
        dropout: dropout rate after fc6 and fc7 (0.5 in the paper).
        freeze_blocks: number of leading conv blocks made non-trainable (Fast R-CNN fine-tunes VGG-16
            from conv3_1 up: ``freeze_blocks=2``).
        input_shape: (H, W, 3); H and W may be None unless ``include_top``.
        input_normalization: "caffe" (default: BGR mean subtraction of the Caffe checkpoints),
            "torchvision" or None.
    """

    def __init__(self, reduced=False, reduced_style="ssd", include_top=False, num_classes=1000, dropout=0.5,
                 freeze_blocks=0, input_shape=(None, None, 3), input_normalization="caffe", name=None, **kwargs):
        if reduced_style not in REDUCED_STYLES:
            raise ValueError(f"VGG16: `reduced_style` must be one of {sorted(REDUCED_STYLES)}, got {reduced_style!r}")
        input_shape = check_input_shape(input_shape, "VGG16")
        if not isinstance(freeze_blocks, int) or not 0 <= freeze_blocks <= 5:
            raise ValueError(f"VGG16: `freeze_blocks` must be an int in [0, 5], got {freeze_blocks!r}")
        if include_top and reduced:
            raise ValueError("VGG16: `include_top` applies to the plain network; the reduced variant "
                             "replaces fc6/fc7 by convolutions")
        if include_top and tuple(input_shape[:2]) != (224, 224):
            raise ValueError(f"VGG16: `include_top=True` needs input_shape (224, 224, 3) for the 7x7x512 "
                             f"fc6 input, got {input_shape}")
        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)
        outputs, strides = {}, {}
        for block, (filters, repeats) in enumerate(VGG16_BLOCKS, 1):
            for i in range(1, repeats + 1):
                x = _conv(x, filters, 3, f"conv{block}_{i}")
            if block == 4:
                outputs["conv4_3"], strides["conv4_3"] = x, 8
            if block == 5:
                outputs["conv5_3"], strides["conv5_3"] = x, 16
                break
            x = keras.layers.MaxPooling2D(2, strides=2, padding="same", name=f"pool{block}")(x)

        if reduced:
            pool_size, pool_stride, dilation = REDUCED_STYLES[reduced_style]
            # "same": 3x3/1 pads 1 on each side (Caffe pad 1); 2x2/2 rounds up (Caffe ceil mode).
            x = keras.layers.MaxPooling2D(pool_size, strides=pool_stride, padding="same", name="pool5")(x)
            x = _conv(x, 1024, 3, "conv_fc6", dilation_rate=dilation)
            x = _conv(x, 1024, 1, "conv_fc7")
            outputs["fc7"], strides["fc7"] = x, 16 * pool_stride
            x = _conv(x, 256, 1, "conv6_1")
            # Explicit symmetric padding as Caffe's pad 1 (Keras "same" would pad only bottom/right).
            x = keras.layers.ZeroPadding2D(1, name="conv6_2_pad")(x)
            x = _conv(x, 512, 3, "conv6_2", strides=2, padding="valid")
            outputs["conv6_2"], strides["conv6_2"] = x, 32 * pool_stride
        else:
            x = keras.layers.MaxPooling2D(2, strides=2, padding="same", name="pool5")(x)
            outputs["pool5"], strides["pool5"] = x, 32
            if include_top:
                x = keras.layers.Flatten(name="flatten")(x)
                x = keras.layers.Dense(4096, activation="relu", name="fc6")(x)
                x = keras.layers.Dropout(dropout, name="drop6")(x)
                x = keras.layers.Dense(4096, activation="relu", name="fc7")(x)
                outputs["fc7"] = x
                x = keras.layers.Dropout(dropout, name="drop7")(x)
                outputs["logits"] = keras.layers.Dense(num_classes, name="fc8")(x)

        default_name = ("vgg16_refinedet" if reduced_style == "refinedet" else "vgg16_reduced") if reduced else "vgg16"
        super().__init__(inputs=inputs, outputs=outputs, strides=strides, name=name or default_name, **kwargs)
        self.reduced = bool(reduced)
        self.reduced_style = reduced_style
        self.include_top = bool(include_top)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.freeze_blocks = freeze_blocks
        for block in range(1, freeze_blocks + 1):
            for i in range(1, VGG16_BLOCKS[block - 1][1] + 1):
                self.get_layer(f"conv{block}_{i}").trainable = False
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization

    def get_config(self):
        return {"reduced": self.reduced, "reduced_style": self.reduced_style, "include_top": self.include_top, "num_classes": self.num_classes,
                "dropout": self.dropout, "freeze_blocks": self.freeze_blocks, "input_shape": list(self._input_shape_arg),
                "input_normalization": self.input_normalization, "name": self.name}


def vgg16(**kwargs):
    """Plain VGG-16; keyword arguments as `VGG16`."""
    return VGG16(reduced=False, **kwargs)


def vgg16_reduced(**kwargs):
    """SSD-style reduced VGG-16 (pool5 3x3/1, conv_fc6 dilation 6) with conv6_1 / conv6_2."""
    return VGG16(reduced=True, reduced_style="ssd", **kwargs)


def vgg16_refinedet(**kwargs):
    """RefineDet's reduced VGG-16 (pool5 2x2/2, conv_fc6 dilation 3): strides 8, 16, 32, 64."""
    return VGG16(reduced=True, reduced_style="refinedet", **kwargs)
