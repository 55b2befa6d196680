"""Normalization layers used by the backbones.

- `FrozenBatchNormalization`: batch normalization reduced to the fixed affine map
  y = gamma * (x - moving_mean) / sqrt(moving_variance + eps) + beta, never trainable and never
  updating its statistics. Detection fine-tuning uses it (Detectron, torchvision detection models)
  because per-GPU batches of 1-2 images give useless batch statistics.
- `LocalResponseNormalization`: the cross-channel LRN of AlexNet / ZF-net (Krizhevsky et al. 2012,
  Zeiler & Fergus 2014), with Caffe's parameterization.
- `L2Normalization`: ParseNet's per-position L2 normalization with a learned per-channel scale
  (Liu et al. 2015), which SSD and RefineDet put on conv4_3 (scale 10) and conv5_3 (scale 8).
"""
import keras
import tensorflow as tf

__all__ = ["FrozenBatchNormalization", "L2Normalization", "LocalResponseNormalization"]


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

    def folded_scale_shift(self):
        """The layer as y = x * scale + shift: float32 ``scale``, ``shift`` of one value per channel
        (also what `kerasdet.backbones.norm_folding` folds into the convolution before it)."""
        scale = tf.math.rsqrt(tf.convert_to_tensor(self.moving_variance) + self.epsilon)
        if self.scale:
            scale = scale * self.gamma
        shift = -tf.convert_to_tensor(self.moving_mean) * scale
        if self.center:
            shift = shift + self.beta
        return scale, shift

    def call(self, inputs, training=None, mask=None):
        # Applied in the layer's compute dtype. Keras' BatchNormalization instead casts
        # half-precision activations to float32 and back around every BN (it must, for batch
        # moments); for a frozen BN that is pure memory traffic: those casts were ~1 s of op time
        # in a ~5 s bfloat16 Mask R-CNN R50-FPN training step (benchmarks/profile_models.py).
        # In float32 this is the same arithmetic as tf.nn.batch_normalization.
        scale, shift = self.folded_scale_shift()
        x = tf.convert_to_tensor(inputs)
        if x.dtype != self.compute_dtype:
            x = tf.cast(x, self.compute_dtype)
        rank = x.shape.rank
        axis = self.axis % rank if rank is not None else self.axis
        if rank is not None and axis != rank - 1:
            broadcast = [1] * rank
            broadcast[axis] = -1
            scale, shift = tf.reshape(scale, broadcast), tf.reshape(shift, broadcast)
        return x * tf.cast(scale, x.dtype) + tf.cast(shift, x.dtype)


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


@keras.saving.register_keras_serializable(package="kerasdet")
class L2Normalization(keras.layers.Layer):
    """y[..., c] = gamma_c * x[..., c] / ||x[...]||_2, the norm taken over the channels of each position.

    ``gamma`` (one per channel) starts at ``scale`` and is learned (ParseNet; SSD / RefineDet use 10
    on conv4_3 and 8 on conv5_3). Wraps `tf.math.l2_normalize`, which divides by
    sqrt(max(sum x^2, epsilon)); Caffe's Normalize layer uses sqrt(sum x^2 + epsilon) instead, which
    differs only for feature vectors of norm below ~1e-5.

    Args:
        scale: initial value of every gamma.
        epsilon: floor of the squared norm.
    """

    def __init__(self, scale=20.0, epsilon=1e-10, **kwargs):
        super().__init__(**kwargs)
        if not scale > 0:
            raise ValueError(f"L2Normalization: `scale` must be positive, got {scale!r}")
        self.scale = float(scale)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("L2Normalization: the channel dimension of the input must be known")
        self.gamma = self.add_weight(name="gamma", shape=(channels,),
                                     initializer=keras.initializers.Constant(self.scale))

    def call(self, inputs):
        # The norm is computed in float32: a sum of squares of float16 activations overflows.
        x = tf.cast(inputs, tf.float32)
        y = tf.math.l2_normalize(x, axis=-1, epsilon=self.epsilon) * tf.cast(self.gamma, tf.float32)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale, "epsilon": self.epsilon})
        return config
