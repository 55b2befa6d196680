"""`WinogradConv2D`: a 3x3 `keras.layers.Conv2D` whose stride-1 float32 convolution on the CPU runs
as Winograd F(4x4, 3x3), or F(6x6, 3x3) on large outputs (`kerasdet.ops.winograd_conv3x3`; when and
why in that module: `winograd_applies`, `winograd_pays`, `winograd_large_tiles`).

Same weights, config and outputs (to float32 rounding, ~1e-5 of the output's range) as
``keras.layers.Conv2D(filters, 3, ...)``; every other case (strides, dilation, groups, bfloat16 /
float16, fewer than `WINOGRAD_MIN_CHANNELS` channels, XLA, a GPU, `_kernels.pure_tf()`) runs the
plain convolution, decided when the layer is traced; so does, outside training, an output of fewer
than `WINOGRAD_MIN_TILES` 4x4 tiles, decided at run time when the image size is not known before.
A stride-2 "valid" layer trained in float32 (ResNet's downsampling 3x3 convs, padded before)
takes `kerasdet.ops.strided_conv3x3` instead: the same convolution, its kernel gradient one matrix
product over the stride phases. Like `PointwiseConv2D` the class answers to the name "Conv2D",
because Keras' weights files address layers by the snake_case of their class name: every
.weights.h5 written with plain Conv2D layers still loads, and back. Its serialized config keeps its
registered name, "kerasdet>WinogradConv2D".
"""
import keras

from kerasdet.ops.strided_conv import strided_conv3x3, strided_phases_apply
from kerasdet.ops.winograd import (select, winograd_applies, winograd_conv3x3, winograd_large_tiles,
                                   winograd_pays)

__all__ = ["WinogradConv2D"]


@keras.saving.register_keras_serializable(package="kerasdet")
class WinogradConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with a 3x3 kernel (``kernel_size`` must be 3 if given)."""

    def __init__(self, filters, kernel_size=3, **kwargs):
        if kernel_size not in (3, (3, 3), [3, 3]):
            raise ValueError(f"WinogradConv2D is a 3x3 convolution; got kernel_size={kernel_size!r}")
        super().__init__(filters, 3, **kwargs)

    def uses_winograd(self, inputs):
        """Whether calling the layer on `inputs` now may take the Winograd form (see
        `kerasdet.ops.winograd.winograd_applies`; the size rule, `winograd_pays`, comes on top)."""
        return (self.data_format == "channels_last"
                and winograd_applies(inputs.dtype, self.kernel_size, self.strides, self.dilation_rate,
                                     self.groups, inputs.shape[-1], self.filters))

    def _winograd(self, inputs, kernel, bias=None, relu=False):
        def form(tile):
            return lambda: winograd_conv3x3(inputs, kernel, self.padding.upper(), tile=tile, bias=bias,
                                            relu=relu)
        return select(winograd_large_tiles(inputs), form(6), form(4))

    def _learning(self, training):
        # Gradients follow only for a trained layer: a frozen one runs the inference rule.
        return training is True and self.trainable

    def _uses_strided_phases(self, inputs, training):
        return (self._learning(training) and self.data_format == "channels_last"
                and strided_phases_apply(inputs.dtype, self.strides, self.padding, self.dilation_rate,
                                         self.groups))

    def call(self, inputs, training=None):
        if self._uses_strided_phases(inputs, training):
            outputs = strided_conv3x3(inputs, self.kernel)
            if self.use_bias:
                outputs = keras.ops.add(outputs, self.bias)
            return outputs if self.activation is None else self.activation(outputs)
        relu = self.activation is keras.activations.relu
        if (not self.uses_winograd(inputs)
                or not (relu or self.activation in (None, keras.activations.linear))):
            return super().call(inputs)
        # Bias and ReLU ride on the output transform's pass instead of two more passes over the output.
        return select(winograd_pays(inputs, training=self._learning(training)),
                      lambda: self._winograd(inputs, self.kernel,
                                             bias=self.bias if self.use_bias else None, relu=relu),
                      lambda: keras.layers.Conv2D.call(self, inputs))

    def convolution_op(self, inputs, kernel):
        if not self.uses_winograd(inputs):
            return super().convolution_op(inputs, kernel)
        return select(winograd_pays(inputs),
                      lambda: self._winograd(inputs, kernel),
                      lambda: keras.layers.Conv2D.convolution_op(self, inputs, kernel))

    def biased_convolution_op(self, inputs, kernel, bias, training=None):
        """convolution_op(inputs, kernel) + bias, in one pass where Winograd applies (the frozen-BN
        fold of the backbones calls it with the folded kernel and shift); ``training`` as in `call`."""
        def direct():
            return keras.ops.add(keras.layers.Conv2D.convolution_op(self, inputs, kernel), bias)

        if self._uses_strided_phases(inputs, training):
            return keras.ops.add(strided_conv3x3(inputs, kernel), bias)
        if not self.uses_winograd(inputs):
            return direct()
        return select(winograd_pays(inputs, training=self._learning(training)),
                      lambda: self._winograd(inputs, kernel, bias=bias), direct)


# See the module docstring: weights-file paths come from the class name.
WinogradConv2D.__name__ = WinogradConv2D.__qualname__ = "Conv2D"
