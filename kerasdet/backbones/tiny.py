"""A tiny backbone for tests: five 3x3 convs, outputs C2..C5 at strides 4, 8, 16, 32.

It has the interface of the real backbones (dict outputs "C2".."C5", `strides`) with about 50k
parameters, so detector tests build and run in a fraction of a second.
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer

DEFAULT_CHANNELS = (8, 16, 32, 48, 64)


@keras.saving.register_keras_serializable(package="kerasdet")
class TinyBackbone(Backbone):
    """conv 3x3/2 (stem) then one conv 3x3/2 + ReLU per level C2..C5.

    Args:
        channels: 5 channel counts (stem, C2, C3, C4, C5).
        input_shape: (H, W, 3); H and W may be None.
        input_normalization: None (default; inputs scaled by 1/255 instead), "torchvision" or "caffe".
    """

    def __init__(self, channels=DEFAULT_CHANNELS, input_shape=(None, None, 3), input_normalization=None,
                 name=None, **kwargs):
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or min(channels) < 1:
            raise ValueError(f"TinyBackbone: `channels` needs 5 positive counts, got {channels}")
        input_shape = check_input_shape(input_shape, "TinyBackbone")
        inputs = keras.Input(shape=input_shape, name="images")
        norm = normalization_layer(input_normalization)
        x = norm(inputs) if norm is not None else keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
        outputs, strides = {}, {}
        names = ("stem", "C2", "C3", "C4", "C5")
        for i, (filters, level) in enumerate(zip(channels, names)):
            # Symmetric padding as in the large backbones: output size ceil(n / 2) for any n.
            x = keras.layers.ZeroPadding2D(1, name=f"{level.lower()}_pad")(x)
            x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu", name=f"{level.lower()}_conv")(x)
            if level != "stem":
                outputs[level] = x
                strides[level] = 2 ** (i + 1)
        super().__init__(inputs=inputs, outputs=outputs, strides=strides, name=name or "tiny", **kwargs)
        self.channels = channels
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization

    def get_config(self):
        return {"channels": list(self.channels), "input_shape": list(self._input_shape_arg),
                "input_normalization": self.input_normalization, "name": self.name}
