"""Normalization layers used by the backbones.

- `FrozenBatchNormalization`: batch normalization reduced to the fixed affine map
  y = gamma * (x - moving_mean) / sqrt(moving_variance + eps) + beta, never trainable and never
  updating its statistics. Detection fine-tuning uses it (Detectron, torchvision detection models)
  because per-GPU batches of 1-2 images give useless batch statistics.
- `LocalResponseNormalization`: the cross-channel LRN of AlexNet / ZF-net (Krizhevsky et al. 2012,
  Zeiler & Fergus 2014), with Caffe's parameterization.
"""
import keras
import tensorflow as tf

__all__ = ["FrozenBatchNormalization", "LocalResponseNormalization"]


@keras.saving.register_keras_serializable(package="kerasdet")
class FrozenBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with frozen statistics and affine parameters.

    It subclasses `keras.layers.BatchNormalization` so that the weights (`gamma`, `beta`,
    `moving_mean`, `moving_variance`, in that order) and their names are exactly those of a normal
    BN layer: checkpoints and `set_weights` lists move between the two unchanged.

    The layer always normalizes with the moving statistics (``training=True`` is ignored) and
    reports no trainable weights; setting ``trainable = True`` on it, or on a model containing it,
    leaves it frozen. Gradients still flow to the input.

    Args:
        axis: the channel axis (channels-last: -1).
        epsilon: added to the variance (torchvision / Detectron use 1e-5).
        **kwargs: the other arguments of `keras.layers.BatchNormalization`.
    """

    def __init__(self, axis=-1, epsilon=1e-5, **kwargs):
        # A config saved from this layer carries trainable=False; any other value is meaningless.
        kwargs.pop("trainable", None)
        super().__init__(axis=axis, epsilon=epsilon, trainable=False, **kwargs)

    @property
    def trainable(self):
        return False

    @trainable.setter
    def trainable(self, value):
        # Model.trainable = True cascades into every sublayer; a frozen BN must stay frozen, so the
        # request is ignored rather than raising (raising would break unfreezing a whole backbone).
        self._trainable = False

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


@keras.saving.register_keras_serializable(package="kerasdet")
class LocalResponseNormalization(keras.layers.Layer):
    """Cross-channel local response normalization with Caffe's parameters.

    b_c = a_c / (k + alpha / n * sum_{c' in window(c)} a_{c'}^2) ** beta, where the window holds the
    ``size`` channels centred on c (Caffe's ACROSS_CHANNELS LRN, as in AlexNet and ZF-net).
    Wraps `tf.nn.local_response_normalization`, whose alpha is not divided by the window size, so
    the conversion alpha / size happens here.

    Args:
        size: odd number of channels in the window (n).
        alpha: Caffe alpha (scaled by 1 / size).
        beta: exponent.
        k: additive bias.
    """

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0, **kwargs):
        super().__init__(**kwargs)
        if int(size) != size or size < 1 or size % 2 != 1:
            raise ValueError(f"LocalResponseNormalization: `size` must be a positive odd integer, got {size!r}")
        self.size = int(size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        # tf.nn.local_response_normalization has no float16 kernel on CPU; compute in float32.
        y = tf.nn.local_response_normalization(
            tf.cast(x, tf.float32),
            depth_radius=self.size // 2,
            bias=self.k,
            alpha=self.alpha / self.size,
            beta=self.beta,
        )
        return tf.cast(y, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k})
        return config
