"""Deformable convolution layer (Deformable ConvNets v1, and v2 with ``use_mask=True``)."""
import keras
import tensorflow as tf

from kerasdet.ops.deform import _pair, deform_conv2d
from kerasdet.ops.xla import kernel_layer_supports_jit

__all__ = ["DeformConv2D"]


@keras.saving.register_keras_serializable(package="kerasdet")
class DeformConv2D(keras.layers.Layer):
    """2-D deformable convolution whose offsets (and v2 mask) are predicted from its own input.

    As in the Deformable ConvNets papers, a regular convolution with the same kernel size, strides,
    padding and dilation reads the input and predicts the 2 * G * kh * kw offsets (plus G * kh * kw
    mask logits passed through a sigmoid when ``use_mask``). That convolution starts at zero, so at
    initialization the layer is a plain convolution (v1) or half of one (v2, mask 0.5), and the
    sampling grid is learned from there.

    Args:
      filters: output channels.
      kernel_size: int or (kh, kw).
      strides, dilation_rate: int or pair.
      padding: "same" (output size of keras.layers.Conv2D "same"), "valid", or an int / pair of
        symmetric zero padding.
      deformable_groups: channel groups that get their own offsets; must divide the input channels.
      use_mask: DCN v2 modulation.
      use_bias: add a bias after the deformable convolution.
      kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer: as in Conv2D.
    """

    supports_jit = kernel_layer_supports_jit()

    def __init__(self, filters, kernel_size, strides=1, padding="same", dilation_rate=1,
                 deformable_groups=1, use_mask=False, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        if self.filters < 1:
            raise ValueError(f"DeformConv2D: `filters` must be >= 1, got {filters}")
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.strides = _pair(strides, "strides", 1)
        self.dilation_rate = _pair(dilation_rate, "dilation_rate", 1)
        if isinstance(padding, str):
            padding = padding.lower()
            if padding not in ("same", "valid"):
                raise ValueError(f"DeformConv2D: `padding` must be 'same', 'valid' or an int / pair, "
                                 f"got {padding!r}")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding", 0)
        self.deformable_groups = int(deformable_groups)
        if self.deformable_groups < 1:
            raise ValueError(f"DeformConv2D: `deformable_groups` must be >= 1, got {deformable_groups}")
        self.use_mask = bool(use_mask)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)

        taps = self.deformable_groups * self.kernel_size[0] * self.kernel_size[1]
        self._taps = taps
        # Explicit padding is applied to the input first, so the offset conv sees the same grid.
        conv_padding = "valid" if not isinstance(self.padding, str) else self.padding
        self.offset_conv = keras.layers.Conv2D(
            3 * taps if self.use_mask else 2 * taps, self.kernel_size, strides=self.strides,
            padding=conv_padding, dilation_rate=self.dilation_rate,
            kernel_initializer="zeros", bias_initializer="zeros", dtype=self.dtype_policy,
            name="offset_conv")

    def build(self, input_shape):
        c_in = input_shape[-1]
        if c_in is None:
            raise ValueError("DeformConv2D: the channel dimension of the input must be known")
        if c_in % self.deformable_groups:
            raise ValueError(f"DeformConv2D: input channels ({c_in}) must be divisible by "
                             f"`deformable_groups` ({self.deformable_groups})")
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, c_in, self.filters),
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,),
                                        initializer=self.bias_initializer,
                                        regularizer=self.bias_regularizer)
        self.offset_conv.build(self._padded_shape(input_shape))

    def _padded_shape(self, input_shape):
        if isinstance(self.padding, str):
            return tuple(input_shape)
        b, h, w, c = input_shape
        ph, pw = self.padding
        return (b, None if h is None else h + 2 * ph, None if w is None else w + 2 * pw, c)

    def _same_padding(self, size, axis):
        """Keras/TF "same" padding (before, after) for one spatial axis; may be asymmetric."""
        k = (self.kernel_size[axis] - 1) * self.dilation_rate[axis] + 1
        s = self.strides[axis]
        out = (size + s - 1) // s
        total = tf.maximum((out - 1) * s + k - size, 0)
        return total // 2, total - total // 2

    def call(self, inputs):
        pad = (0, 0)
        x = inputs
        if self.padding == "same":
            if self.strides == (1, 1) and all(k % 2 for k in self.kernel_size):
                # Symmetric: let the op pad (no copy of the input).
                pad = tuple((k - 1) // 2 * d for k, d in zip(self.kernel_size, self.dilation_rate))
            else:
                shape = tf.shape(inputs)
                top, bottom = self._same_padding(shape[1], 0)
                left, right = self._same_padding(shape[2], 1)
                x = tf.pad(inputs, [[0, 0], [top, bottom], [left, right], [0, 0]])
        elif self.padding != "valid":
            ph, pw = self.padding
            x = tf.pad(inputs, [[0, 0], [ph, ph], [pw, pw], [0, 0]])

        predicted = self.offset_conv(inputs if self.padding == "same" else x)
        offsets = predicted[..., : 2 * self._taps]
        mask = keras.ops.sigmoid(predicted[..., 2 * self._taps:]) if self.use_mask else None
        outputs = deform_conv2d(x, offsets, self.kernel, mask=mask, strides=self.strides,
                                padding=pad, dilation=self.dilation_rate,
                                deformable_groups=self.deformable_groups)
        if self.use_bias:
            outputs = outputs + self.bias
        return outputs

    def compute_output_shape(self, input_shape):
        conv_padding = self.padding if isinstance(self.padding, str) else "valid"
        b, h, w, _ = self._padded_shape(input_shape)
        sizes = []
        for size, k, s, d in zip((h, w), self.kernel_size, self.strides, self.dilation_rate):
            if size is None:
                sizes.append(None)
            elif conv_padding == "same":
                sizes.append((size + s - 1) // s)
            else:
                sizes.append((size - (k - 1) * d - 1) // s + 1)
        return (b, sizes[0], sizes[1], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
            padding=self.padding if isinstance(self.padding, str) else list(self.padding),
            dilation_rate=self.dilation_rate, deformable_groups=self.deformable_groups,
            use_mask=self.use_mask, use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            bias_regularizer=keras.regularizers.serialize(self.bias_regularizer))
        return config
