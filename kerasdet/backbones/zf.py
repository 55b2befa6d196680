"""ZF-5: the Zeiler & Fergus net used by SPP-net (He et al. 2014) and Faster R-CNN.

Variant: the five convolutional layers of Zeiler & Fergus, "Visualizing and Understanding
Convolutional Networks" (ECCV 2014), Fig. 3, which SPP-net calls ZF-5 (its Table 1):
    conv1  96 7x7/2, padding 1 -> ReLU -> pool1 3x3/2 -> LRN    (224 -> 110 -> 55)
    conv2 256 5x5/2            -> ReLU -> pool2 3x3/2 -> LRN    (55 -> 26 -> 13)
    conv3 384 3x3/1, padding 1 -> ReLU                          (13)
    conv4 384 3x3/1, padding 1 -> ReLU                          (13)
    conv5 256 3x3/1, padding 1 -> ReLU                          (13; output "conv5", stride 16)
The pools round up (Caffe's ceil mode), which is what gives the paper's 55 and 13. The ceil is done
by zero padding on the bottom/right before a "valid" pool; it is exact because the pooled values are
post-ReLU (>= 0) and every window keeps at least one real pixel. LRN is the cross-channel contrast
normalization of AlexNet (size 5, alpha 1e-4, beta 0.75, k 1 by default, Caffe parameters).
R-CNN / SPP-net / Fast R-CNN pool RoIs (or the spatial pyramid) from conv5.
"""
import keras

from kerasdet.backbones.base import Backbone, check_input_shape, normalization_layer
from kerasdet.layers.normalization import LocalResponseNormalization


def _ceil_max_pool(x, size, stride, name):
    # Pad bottom/right by stride - 1 so that "valid" gives ceil((n - size) / stride) + 1 windows.
    x = keras.layers.ZeroPadding2D(((0, stride - 1), (0, stride - 1)), name=f"{name}_pad")(x)
    return keras.layers.MaxPooling2D(size, strides=stride, padding="valid", name=name)(x)


@keras.saving.register_keras_serializable(package="kerasdet")
class ZF5(Backbone):
    """ZF-5 feature extractor with output "conv5" (stride 16).

    Args:
        lrn_size, lrn_alpha, lrn_beta, lrn_k: parameters of the two LRN layers (Caffe convention).
        input_shape: (H, W, 3); H and W may be None.
        input_normalization: "caffe" (default), "torchvision" or None.
    """

    def __init__(self, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=1.0, input_shape=(None, None, 3),
                 input_normalization="caffe", name=None, **kwargs):
        input_shape = check_input_shape(input_shape, "ZF5", min_size=39)
        inputs = keras.Input(shape=input_shape, name="images")
        x = inputs
        norm = normalization_layer(input_normalization)
        if norm is not None:
            x = norm(x)

        def lrn(name):
            return LocalResponseNormalization(lrn_size, lrn_alpha, lrn_beta, lrn_k, name=name)

        x = keras.layers.ZeroPadding2D(1, name="conv1_pad")(x)
        x = keras.layers.Conv2D(96, 7, strides=2, activation="relu", name="conv1")(x)
        x = lrn("norm1")(_ceil_max_pool(x, 3, 2, "pool1"))
        x = keras.layers.Conv2D(256, 5, strides=2, activation="relu", name="conv2")(x)
        x = lrn("norm2")(_ceil_max_pool(x, 3, 2, "pool2"))
        x = keras.layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
        x = keras.layers.Conv2D(384, 3, padding="same", activation="relu", name="conv4")(x)
        x = keras.layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
        super().__init__(inputs=inputs, outputs={"conv5": x}, strides={"conv5": 16}, name=name or "zf5", **kwargs)
        self.lrn_size, self.lrn_alpha, self.lrn_beta, self.lrn_k = lrn_size, lrn_alpha, lrn_beta, lrn_k
        self._input_shape_arg = input_shape
        self.input_normalization = input_normalization

    def get_config(self):
        return {"lrn_size": self.lrn_size, "lrn_alpha": self.lrn_alpha, "lrn_beta": self.lrn_beta,
                "lrn_k": self.lrn_k, "input_shape": list(self._input_shape_arg),
                "input_normalization": self.input_normalization, "name": self.name}
