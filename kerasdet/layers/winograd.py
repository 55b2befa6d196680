"""`WinogradConv2D`: a 3x3 `keras.layers.Conv2D` whose stride-1 float32 convolution on the CPU runs
as Winograd F(4x4, 3x3) (`kerasdet.ops.winograd_conv3x3`; when and why in that module).

Same weights, config and outputs (to float32 rounding, ~1e-5 of the output's range) as
``keras.layers.Conv2D(filters, 3, ...)``; every other case (strides, dilation, groups, bfloat16 /
float16, fewer than `WINOGRAD_MIN_CHANNELS` channels, XLA, a GPU, `_kernels.pure_tf()`) runs the
plain convolution, decided when the layer is traced. Like `PointwiseConv2D` the class answers to
the name "Conv2D", because Keras' weights files address layers by the snake_case of their class
name: every .weights.h5 written with plain Conv2D layers still loads, and back. Its serialized config
keeps its registered name, "kerasdet>WinogradConv2D".
"""
import keras

from kerasdet.ops.winograd import winograd_applies, winograd_conv3x3

__all__ = ["WinogradConv2D"]


@keras.saving.register_keras_serializable(package="kerasdet")
class WinogradConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` with a 3x3 kernel (``kernel_size`` must be 3 if given)."""

    def __init__(self, filters, kernel_size=3, **kwargs):
        if kernel_size not in (3, (3, 3), [3, 3]):
            raise ValueError(f"WinogradConv2D is a 3x3 convolution; got kernel_size={kernel_size!r}")
        super().__init__(filters, 3, **kwargs)

    def uses_winograd(self, inputs):
        """Whether calling the layer on `inputs` now takes the Winograd form."""
        return (self.data_format == "channels_last"
                and winograd_applies(inputs.dtype, self.kernel_size, self.strides, self.dilation_rate,
                                     self.groups, inputs.shape[-1], self.filters))

    # Also what the frozen-BN fold of the backbones calls (norm_folding), with the folded kernel.
    def convolution_op(self, inputs, kernel):
        if self.uses_winograd(inputs):
            return winograd_conv3x3(inputs, kernel, self.padding.upper())
        return super().convolution_op(inputs, kernel)


# See the module docstring: weights-file paths come from the class name.
WinogradConv2D.__name__ = WinogradConv2D.__qualname__ = "Conv2D"
