"""AlexNet-style backbones for R-CNN (Girshick et al. 2014): conv1..conv5, pool5, fc6, fc7 on 227x227 crops.

Three variants with the same structure (5 convs, 3 overlapping 3x3/2 max pools, two 4096-unit fully
connected layers, a classifier):

"torchvision" -- ``torchvision.models.alexnet``'s layout exactly, so its checkpoints convert
(`kerasdet.converters.alexnet`). This is the "one weird trick" network (Krizhevsky 2014,
arXiv:1404.5997): 64/192/384/256/256 channels, no LRN, no grouped convolutions. It is NOT the 2012
net R-CNN used; its channel widths differ.
    features.0   conv1  64 11x11/4, pad 2 -> ReLU -> pool1 3x3/2     227 -> 56 -> 27   (224 -> 55 -> 27)
    features.3   conv2 192  5x5/1, pad 2 -> ReLU -> pool2 3x3/2      27 -> 27 -> 13
    features.6   conv3 384  3x3/1, pad 1 -> ReLU                     13
    features.8   conv4 256  3x3/1, pad 1 -> ReLU                     13
    features.10  conv5 256  3x3/1, pad 1 -> ReLU -> pool5 3x3/2      13 -> 6   (output "pool5", 6x6x256)
    avgpool      AdaptiveAvgPool2d((6, 6)): the identity on a 6x6 map (see below)
    classifier   Dropout -> fc6 4096 (classifier.1) -> ReLU -> Dropout -> fc7 4096 (classifier.4) -> ReLU
                 -> fc8 num_classes (classifier.6)
  Pools round down (PyTorch's default). conv1 at 227: floor((227 + 4 - 11) / 4) + 1 = 56, pool1
  floor((56 - 3) / 2) + 1 = 27; at 224: floor(217 / 4) + 1 = 55, pool1 27. From 27 on both agree:
  27 -> 13 -> 6. So pool5 is 6x6 at 224 and at 227, and torchvision's adaptive average pool to 6x6
  does nothing there. It is not implemented: with ``include_top`` the input must give a 6x6 pool5
  (sides 223 to 254 do; anything else raises a ValueError).

"caffe" -- the 2012 network (Krizhevsky, Sutskever & Hinton, NIPS 2012) in its single-tower Caffe
form, the one R-CNN fine-tuned: 96/256/384/384/256 channels, LRN after conv1 and conv2, and conv2,
conv4, conv5 in 2 groups (the two GPU halves: each half of the output channels sees only the
matching half of the input channels).
    conv1  96 11x11/4          -> ReLU -> norm1 LRN -> pool1 3x3/2   227 -> 55 -> 27
    conv2 256  5x5/1, pad 2, 2 groups -> ReLU -> norm2 LRN -> pool2   27 -> 27 -> 13
    conv3 384  3x3/1, pad 1          -> ReLU                          13
    conv4 384  3x3/1, pad 1, 2 groups -> ReLU                         13
    conv5 256  3x3/1, pad 1, 2 groups -> ReLU -> pool5 3x3/2          13 -> 6   (6x6x256)
    fc6 4096 -> ReLU -> Dropout -> fc7 4096 -> ReLU -> Dropout -> fc8 num_classes
  LRN: size 5, alpha 1e-4, beta 0.75, k 1 in Caffe's convention
  b_c = a_c / (k + alpha / size * sum_{|c'-c| <= 2} a_c'^2) ** beta, i.e. alpha is divided by the
  window size (`kerasdet.layers.LocalResponseNormalization` converts to TensorFlow's
  depth_radius = size // 2 and undivided alpha). Pools round up (Caffe's ceil mode); at 227 this gives
  the same 27 / 13 / 6 as rounding down. The paper's order is norm then pool; BVLC's CaffeNet (the
  checkpoint R-CNN actually started from) pools first, then normalizes: ``pool_before_lrn=True``.
  There is no converter for this variant: no Caffe AlexNet / CaffeNet checkpoint is available offline.

"tiny" -- not in any paper: the same structure (strided conv1, three 3x3/2 max pools, conv3..5 at
one scale, two fully connected layers, no LRN) with small widths, for tests and synthetic data sets
so that R-CNN trains on CPU. Default crop 64x64:
    conv1 16 5x5/2, pad 2 -> pool1 (64 -> 32 -> 15); conv2 32 3x3 -> pool2 (15 -> 7);
    conv3 48, conv4 48, conv5 32 (3x3) -> pool5 (7 -> 3, 3x3x32); fc6 128; fc7 128.

Outputs: "pool5" (spatial, stride 32; 16 for tiny; R-CNN's bounding-box regression reads it) and,
with ``include_top``, "fc6", "fc7" (after their ReLU; R-CNN's SVMs read fc7) and "logits" (fc8).
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer
from kerasdet.backbones.zf import _ceil_max_pool
from kerasdet.layers.normalization import LocalResponseNormalization

VARIANTS = ("torchvision", "caffe", "tiny")
# (channels, kernel, stride, symmetric zero padding, groups, max-pool after it) of conv1..conv5.
ALEXNET_CONVS = {
    "torchvision": ((64, 11, 4, 2, 1, True), (192, 5, 1, 2, 1, True), (384, 3, 1, 1, 1, False),
                    (256, 3, 1, 1, 1, False), (256, 3, 1, 1, 1, True)),
    "caffe": ((96, 11, 4, 0, 1, True), (256, 5, 1, 2, 2, True), (384, 3, 1, 1, 1, False),
              (384, 3, 1, 1, 2, False), (256, 3, 1, 1, 2, True)),
    "tiny": ((16, 5, 2, 2, 1, True), (32, 3, 1, 1, 1, True), (48, 3, 1, 1, 1, False),
             (48, 3, 1, 1, 1, False), (32, 3, 1, 1, 1, True)),
}
FC_UNITS = {"torchvision": 4096, "caffe": 4096, "tiny": 128}
DEFAULT_INPUT_SIZE = {"torchvision": 227, "caffe": 227, "tiny": 64}
DEFAULT_NORMALIZATION = {"torchvision": "torchvision", "caffe": "caffe", "tiny": None}
# The fc6 input grid the classifier was designed for (torchvision's adaptive pool target).
POOL5_SIZE = {"torchvision": 6, "caffe": 6, "tiny": None}
POOL_SIZE, POOL_STRIDE = 3, 2


def pool5_size(variant, side):
    """Side of pool5 for an input side ``side`` (None stays None)."""
    if side is None:
        return None
    for _, kernel, stride, pad, _, pooled in ALEXNET_CONVS[variant]:
        side = (side + 2 * pad - kernel) // stride + 1
        if pooled:
            if variant == "caffe":
                side = -(-(side - POOL_SIZE) // POOL_STRIDE) + 1
            else:
                side = (side - POOL_SIZE) // POOL_STRIDE + 1
        if side < 1:
            return 0
    return side


def _total_stride(variant):
    stride = 1
    for _, _, conv_stride, _, _, pooled in ALEXNET_CONVS[variant]:
        stride *= conv_stride * (POOL_STRIDE if pooled else 1)
    return stride


@keras.saving.register_keras_serializable(package="kerasdet")
class AlexNet(Backbone):
    """AlexNet-style backbone (see the module docstring for the variants and layer tables).

    Args:
        variant: "torchvision" (torchvision's layout, convertible), "caffe" (2012 / R-CNN net with
            LRN and groups) or "tiny" (small, for tests).
        include_top: add fc6, fc7 and the fc8 classifier (outputs "fc6", "fc7", "logits").
        num_classes: fc8 size (1000 for ImageNet).
        dropout: rate of the two dropout layers.
        pool_before_lrn: caffe variant only: CaffeNet's order (pool then LRN) instead of the paper's.
        lrn_size, lrn_alpha, lrn_beta, lrn_k: caffe variant's LRN, Caffe convention (alpha / size).
        input_shape: (H, W, 3); default (227, 227, 3) (tiny: (64, 64, 3)). H, W may be None only
            without ``include_top``.
        input_normalization: "torchvision", "caffe", None, or "default": the variant's own
            ("torchvision" for torchvision, "caffe" for caffe, None for tiny). None: the pixels
            as given, except in the tiny variant, which scales them by 1 / 255.
    """

    def __init__(self, variant="torchvision", include_top=True, num_classes=1000, dropout=0.5,
                 pool_before_lrn=False, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=1.0,
                 input_shape=None, input_normalization="default", name=None, **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"AlexNet: `variant` must be one of {VARIANTS}, got {variant!r}")
        if input_shape is None:
            input_shape = (DEFAULT_INPUT_SIZE[variant],) * 2 + (3,)
        input_shape = check_input_shape(input_shape, f"AlexNet-{variant}")
        if input_normalization == "default":
            input_normalization = DEFAULT_NORMALIZATION[variant]
        grid = [pool5_size(variant, side) for side in input_shape[:2]]
        if any(g is not None and g < 1 for g in grid):
            raise ValueError(f"AlexNet-{variant}: input {input_shape} is too small, pool5 would be empty")
        if include_top:
            if None in grid:
                raise ValueError(f"AlexNet-{variant}: `include_top=True` needs a fixed input size "
                                 f"(the fully connected fc6 reads the whole pool5), got {input_shape}")
            want = POOL5_SIZE[variant]
            if want is not None and tuple(grid) != (want, want):
                raise ValueError(
                    f"AlexNet-{variant}: `include_top=True` needs an input giving a {want}x{want} pool5 "
                    f"(e.g. 227x227 or 224x224), got {input_shape} -> pool5 {grid[0]}x{grid[1]}; adaptive "
                    "average pooling to 6x6 (torchvision's avgpool at other sizes) is not implemented")

        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)
        elif variant == "tiny":
            # the tiny net (no checkpoint) sees [0, 1] pixels, as kerasdet's tiny backbone: raw
            # 0..255 inputs overflow its float16 activations under mixed precision
            x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(x)
        for i, (filters, kernel, stride, pad, groups, pooled) in enumerate(ALEXNET_CONVS[variant], 1):
            if pad:
                # Explicit symmetric padding: Keras "same" with stride 4 would pad unevenly.
                x = keras.layers.ZeroPadding2D(pad, name=f"conv{i}_pad")(x)
            x = keras.layers.Conv2D(filters, kernel, strides=stride, groups=groups, activation="relu",
                                    name=f"conv{i}")(x)
            lrn = variant == "caffe" and i <= 2
            if lrn and not pool_before_lrn:
                x = LocalResponseNormalization(lrn_size, lrn_alpha, lrn_beta, lrn_k, name=f"norm{i}")(x)
            if pooled:
                if variant == "caffe":
                    x = _ceil_max_pool(x, POOL_SIZE, POOL_STRIDE, f"pool{i}")
                else:
                    x = keras.layers.MaxPooling2D(POOL_SIZE, strides=POOL_STRIDE, name=f"pool{i}")(x)
            if lrn and pool_before_lrn:
                x = LocalResponseNormalization(lrn_size, lrn_alpha, lrn_beta, lrn_k, name=f"norm{i}")(x)
        outputs = {"pool5": x}
        strides = {"pool5": _total_stride(variant)}
        if include_top:
            units = FC_UNITS[variant]
            x = keras.layers.Flatten(name="flatten")(x)
            # torchvision drops out before each Linear, Caffe after each ReLU; the outputs "fc6" /
            # "fc7" are the post-ReLU activations in both (Caffe's in-place relu6 / relu7).
            torch_order = variant != "caffe"
            for j in (6, 7):
                if torch_order:
                    x = keras.layers.Dropout(dropout, name=f"drop{j}")(x)
                x = keras.layers.Dense(units, activation="relu", name=f"fc{j}")(x)
                outputs[f"fc{j}"] = x
                if not torch_order:
                    x = keras.layers.Dropout(dropout, name=f"drop{j}")(x)
            outputs["logits"] = keras.layers.Dense(num_classes, name="fc8")(x)
        super().__init__(inputs=inputs, outputs=outputs, strides=strides,
                         name=name or ("alexnet" if variant == "torchvision" else f"alexnet_{variant}"), **kwargs)
        self.variant = variant
        self.include_top = bool(include_top)
        self.num_classes = int(num_classes)
        self.dropout = float(dropout)
        self.pool_before_lrn = bool(pool_before_lrn)
        self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k = lrn_size, lrn_alpha, lrn_beta, lrn_k
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization

    def get_config(self):
        return {"variant": self.variant, "include_top": self.include_top, "num_classes": self.num_classes,
                "dropout": self.dropout, "pool_before_lrn": self.pool_before_lrn, "lrn_size": self.lrn_size,
                "lrn_alpha": self.lrn_alpha, "lrn_beta": self.lrn_beta, "lrn_k": self.lrn_k,
                "input_shape": list(self._input_shape_arg), "input_normalization": self.input_normalization,
                "name": self.name}


def alexnet(**kwargs):
    """torchvision's AlexNet layout (the 2014 "one weird trick" widths 64/192/384/256/256)."""
    return AlexNet(variant="torchvision", **kwargs)


def alexnet_caffe(**kwargs):
    """The 2012 AlexNet as R-CNN used it (96/256/384/384/256, LRN, 2 groups); no converter."""
    return AlexNet(variant="caffe", **kwargs)


def alexnet_tiny(**kwargs):
    """Small AlexNet-structured net for tests / CPU training (64x64 crops, fc 128); not in any paper."""
    return AlexNet(variant="tiny", **kwargs)
