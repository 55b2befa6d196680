"""Stride-1 1x1 convolution whose gradients are matrix products.

A 1x1 convolution over [B, H, W, Ci] multiplies the [B * H * W, Ci] matrix of pixels by the [Ci, Co]
kernel, so its kernel gradient is pixels^T @ dy and its input gradient dy @ kernel^T. TensorFlow
differentiates the convolution with oneDNN's convolution backward kernels instead. On the stride-1
1x1 shapes of ResNet-50 and FPN at 800 x 1216 (batch 2), forward + both gradients took 0.48-0.96x
the time as matrix products in bfloat16 (AMX; 0.70x summed over the model's layers).

In float32 (AMD EPYC, AVX-512) it depends on the pass. `python benchmarks/pointwise_conv.py
--dtypes float32` (its per-pass columns, summed over the model's layers): the kernel gradient as a
matrix product 923 against oneDNN's 988 ms (0.93x; per shape 0.75-1.18), the input gradient 1083
against 1074 ms; per shape the product was 0.94-1.0x of oneDNN's for layers that reduce the
channels (Ci > Co) and 1.23x / 1.28x / 0.94x for the three that expand them (the bottlenecks'
conv3, Co > Ci). Two ad-hoc per-pass timings in the same session gave 0.91-0.93x for the kernel
gradients and 1.19-1.37x for the expanding layers' input gradients. So float32 takes the matrix
product for the kernel gradient and for the input gradient of a reducing layer, and oneDNN's
backward-data convolution for the rest.

The strided (downsampling) 1x1 convolutions stay TensorFlow's: a strided variant (every s-th pixel,
the input gradient by conv2d_transpose) measured 0.66-1.6x, no gain over the three of them. The
forward pass is the same convolution as `keras.layers.Conv2D`'s.
"""
import tensorflow as tf

from kerasdet.ops.conv_args import checked_conv_arguments

__all__ = ["pointwise_conv2d"]


def pointwise_conv2d(inputs, kernel):
    """``tf.nn.conv2d(inputs, kernel, 1, "VALID")`` for a [1, 1, Ci, Co] kernel on channels-last
    [B, H, W, Ci] inputs ("SAME" is the same for a 1x1 kernel), with its gradients computed as matrix
    products (see the module docstring)."""
    inputs, kernel = checked_conv_arguments("pointwise_conv2d", inputs, kernel, 1)
    return _pointwise(inputs, kernel)


@tf.custom_gradient
def _pointwise(x, w):
    y = tf.nn.conv2d(x, w, 1, "VALID")

    def grad(dy):
        channels_in, channels_out = w.shape[2], w.shape[3]
        pixels = tf.reshape(x, [-1, channels_in])
        dy_rows = tf.reshape(dy, [-1, channels_out])
        dw = tf.reshape(tf.matmul(pixels, dy_rows, transpose_a=True), tf.shape(w))
        if x.dtype == tf.float32 and channels_out >= channels_in:  # see the module docstring
            dx = tf.compat.v1.nn.conv2d_backprop_input(tf.shape(x), w, dy, [1, 1, 1, 1], "VALID")
        else:
            dx = tf.reshape(tf.matmul(dy_rows, tf.reshape(w, [channels_in, channels_out]), transpose_b=True),
                            tf.shape(x))
        return dx, dw

    return y, grad
