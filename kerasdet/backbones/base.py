"""Shared pieces of the backbones: the `Backbone` model base class and input normalization.

A backbone is a Keras functional model (subclass of `Backbone`) whose outputs are a dict of named
feature maps (e.g. "C2".."C5" for ResNet, "conv4_3".."conv6_2" for VGG-16 reduced), plus "logits"
when a classifier top is included. It carries `strides`, a dict from each feature-map name (in
order, shallowest first) to its total stride relative to the input image, so
necks and heads can place anchors and pool RoIs without knowing the architecture.
"""
import keras
import numpy as np

from kerasdet.backbones.norm_folding import FoldsFrozenNorms

# Per-channel statistics of the two checkpoint families the backbones are meant to load.
# torchvision ImageNet models: RGB input in [0, 1] normalized by these mean / std.
TORCHVISION_MEAN = (0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0)
TORCHVISION_STD = (0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0)
# Caffe models (VGG-16 of SSD / RefineDet, ZF): BGR input in [0, 255] minus the BGR pixel mean.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

INPUT_NORMALIZATIONS = ("torchvision", "caffe", None)


@keras.saving.register_keras_serializable(package="kerasdet")
class ImageNormalization(keras.layers.Layer):
    """Maps RGB 0..255 images to the input a pretrained checkpoint expects.

    y = (x[..., order] - mean) / std, with order = BGR when ``bgr`` is set. Written here rather than
    with `keras.layers.Normalization` because the Caffe checkpoints also need the RGB->BGR channel
    swap, and one layer keeps the whole mapping in one config.

    Args:
        mean: 3 per-channel means, in the output channel order.
        std: 3 per-channel standard deviations, in the output channel order.
        bgr: reverse the channel order before normalizing.
    """

    def __init__(self, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=False, **kwargs):
        super().__init__(**kwargs)
        mean = [float(v) for v in mean]
        std = [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"ImageNormalization: `mean` and `std` need 3 values, got mean={mean}, std={std}")
        if min(std) <= 0:
            raise ValueError(f"ImageNormalization: `std` must be positive, got {std}")
        self.mean = mean
        self.std = std
        self.bgr = bool(bgr)

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.bgr:
            x = keras.ops.flip(x, axis=-1)
        mean = keras.ops.convert_to_tensor(np.asarray(self.mean), dtype=self.compute_dtype)
        inv_std = keras.ops.convert_to_tensor(1.0 / np.asarray(self.std), dtype=self.compute_dtype)
        return (x - mean) * inv_std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "std": list(self.std), "bgr": self.bgr})
        return config


def normalization_layer(kind):
    """The `ImageNormalization` layer for a checkpoint family ("torchvision", "caffe") or None."""
    if kind is None:
        return None
    if kind == "torchvision":
        return ImageNormalization(TORCHVISION_MEAN, TORCHVISION_STD, bgr=False, name="input_normalization")
    if kind == "caffe":
        return ImageNormalization(CAFFE_BGR_MEAN, (1.0, 1.0, 1.0), bgr=True, name="input_normalization")
    raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got {kind!r}")


def check_input_shape(input_shape, name, min_size=None):
    """Validates an (H, W, 3) input shape (H, W may be None) and returns it as a tuple."""
    try:
        input_shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"{name}: `input_shape` must be a tuple (H, W, 3), got {input_shape!r}") from None
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"{name}: `input_shape` must be (H, W, 3) channels-last RGB, got {input_shape}")
    for dim in input_shape[:2]:
        if dim is not None and (int(dim) != dim or dim < 1):
            raise ValueError(f"{name}: spatial sizes in `input_shape` must be positive integers or None, "
                             f"got {input_shape}")
        if dim is not None and min_size is not None and dim < min_size:
            raise ValueError(f"{name}: input size {dim} is smaller than the minimum {min_size} "
                             f"this network needs (input_shape={input_shape})")
    return input_shape


class Backbone(FoldsFrozenNorms, keras.Model):
    """Base class of the backbones: a functional model with dict outputs and output strides.

    Its `call` folds each frozen BN into the convolution before it (`norm_folding`).

    Subclasses build their graph in ``__init__`` and call
    ``super().__init__(inputs=..., outputs={name: tensor}, strides={name: int}, name=...)``;
    `get_config` must return the subclass's constructor arguments so `from_config(cls, config)`
    rebuilds the same architecture (weights travel separately, e.g. in a `.keras` file).
    """

    def __init__(self, inputs, outputs, strides, **kwargs):
        # Every stride must name an output; outputs without a stride are non-spatial (e.g. logits).
        unknown = set(strides) - set(outputs)
        if unknown:
            raise ValueError(f"Backbone: strides given for {sorted(unknown)}, which are not outputs")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.strides = {k: int(v) for k, v in strides.items()}

    def freeze_stages(self, stage_of_layer, freeze_at):
        """Makes every layer whose stage (``stage_of_layer(name)``, None = no stage) is below
        ``freeze_at`` non-trainable: Detectron's freeze_at convention."""
        for layer in self.layers:
            stage = stage_of_layer(layer.name)
            if stage is not None and stage < freeze_at:
                layer.trainable = False

    @property
    def feature_names(self):
        """The names of the output feature maps, shallowest first."""
        return list(self.strides)

    @classmethod
    def from_config(cls, config):
        return cls(**config)
