"""Stride-2 3x3 convolution whose kernel gradient is one matrix product over the stride phases.

A "VALID" stride-2 3x3 convolution reads y[i, j] = sum_{a, b} x[2i + a, 2j + b] @ w[a, b], so its
kernel gradient is dw[a, b] = sum_{i, j} x[2i + a, 2j + b]^T dy[i, j]: with the nine shifted,
subsampled views of x side by side as the columns of a [pixels, 9 Ci] matrix, all of dw is one
[9 Ci, pixels] @ [pixels, Co] product. The views come from the four stride phases of x (a reshape,
rows and columns split into even and odd) sliced at offsets 0 and 1, so no strided gather is needed.
TensorFlow's oneDNN backward-filter kernel runs this case far below its forward rate: on ResNet-50's
three strided 3x3 layers at 800 x 1216, batch 2 (AMD EPYC, 2 cores, ad-hoc timing in isolation),
111 / 118 / 67 ms against 73 / 58 / 55 ms for the phase product (forming the [pixels, 9 Ci]
matrix included; it is transient, 140 MB for layer2). Whole training steps at that size, ad-hoc
A/B of two models in one process (6 pairs each, the other model's strided layers on TensorFlow's
gradient): Faster R-CNN R50-FPN 0.968x (paired 0.966), Mask R-CNN R50-FPN 0.954x (paired 0.972).

The forward pass and the input gradient stay TensorFlow's convolution and backward-data kernels
(the phase form of the forward pass was slower: 79 against 48 ms on layer2's shape).
"""
import tensorflow as tf

from kerasdet.ops.conv_args import checked_conv_arguments
from kerasdet.ops.winograd import _gpu_visible

__all__ = ["strided_conv3x3", "strided_phases_apply"]


def strided_phases_apply(dtype, strides, padding, dilation_rate=(1, 1), groups=1):
    """Whether a trained 3x3 convolution with these settings, traced now, should run as
    `strided_conv3x3`: float32 (the only dtype measured), stride 2, "valid", no dilation or groups,
    and no GPU (whose convolution gradients were not measured against it)."""
    return (tf.as_dtype(dtype) == tf.float32 and tuple(strides) == (2, 2)
            and str(padding).lower() == "valid" and tuple(dilation_rate) == (1, 1) and groups == 1
            and not _gpu_visible())


def strided_conv3x3(inputs, kernel):
    """``tf.nn.conv2d(inputs, kernel, 2, "VALID")`` for a [3, 3, Ci, Co] kernel on channels-last
    [B, H, W, Ci] inputs (H, W >= 3; pad before calling for "SAME"-like borders), with the kernel
    gradient computed as one matrix product over the stride phases (see the module docstring)."""
    inputs, kernel = checked_conv_arguments("strided_conv3x3", inputs, kernel, 3)
    for axis, name in ((1, "height"), (2, "width")):
        size = inputs.shape[axis]
        if size is not None and size < 3:
            raise ValueError(f"strided_conv3x3: inputs' {name} is {size}; a VALID 3x3 convolution "
                             f"needs at least 3")
    return _strided(inputs, kernel)


def phase_columns(x, out_height, out_width):
    """[B, Ho, Wo, 9 Ci]: for tap (a, b) (row-major), x[2i + a, 2j + b] at output pixel (i, j)."""
    batch, channels = tf.shape(x)[0], x.shape[-1]
    # Exactly 2 Ho + 2 rows and 2 Wo + 2 columns: the last one is padding when H or W is odd (no
    # tap reads it), and a row beyond 2 Ho + 1 is never read by a VALID stride-2 3x3 window.
    x = x[:, :2 * out_height + 2, :2 * out_width + 2]
    x = tf.pad(x, [[0, 0], [0, 2 * out_height + 2 - tf.shape(x)[1]],
                   [0, 2 * out_width + 2 - tf.shape(x)[2]], [0, 0]])
    phases = tf.reshape(x, [batch, out_height + 1, 2, out_width + 1, 2, channels])
    return tf.concat([phases[:, a // 2:a // 2 + out_height, a % 2, b // 2:b // 2 + out_width, b % 2]
                      for a in range(3) for b in range(3)], axis=-1)


@tf.custom_gradient
def _strided(x, w):
    y = tf.nn.conv2d(x, w, 2, "VALID")

    def grad(dy):
        channels_in, channels_out = w.shape[2], w.shape[3]
        columns = tf.reshape(phase_columns(x, tf.shape(dy)[1], tf.shape(dy)[2]), [-1, 9 * channels_in])
        dw = tf.matmul(columns, tf.reshape(dy, [-1, channels_out]), transpose_a=True)
        dx = tf.compat.v1.nn.conv2d_backprop_input(tf.shape(x), w, dy, [1, 2, 2, 1], "VALID")
        return dx, tf.reshape(dw, tf.shape(w))

    return y, grad
