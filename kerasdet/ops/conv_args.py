"""Argument checks shared by kerasdet's own convolutions (`pointwise_conv2d`, `winograd_conv3x3`)."""
import tensorflow as tf

__all__ = []


def checked_conv_arguments(op, inputs, kernel, size):
    """(inputs, kernel) as tensors: channels-last [B, H, W, Ci] inputs and a [size, size, Ci, Co]
    kernel of the same dtype. Errors name `op` and the argument."""
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.convert_to_tensor(kernel, dtype_hint=inputs.dtype)
    if inputs.shape.rank != 4:
        raise ValueError(f"{op}: inputs must be [B, H, W, C] (channels last), got {inputs.shape}")
    if kernel.shape.rank != 4 or tuple(kernel.shape[:2]) != (size, size):
        raise ValueError(f"{op}: the kernel must have shape [{size}, {size}, Ci, Co], got {kernel.shape}")
    if inputs.dtype != kernel.dtype:
        raise TypeError(f"{op}: inputs are {inputs.dtype.name} but the kernel is {kernel.dtype.name}")
    if inputs.shape[-1] is not None and kernel.shape[2] != inputs.shape[-1]:
        raise ValueError(f"{op}: inputs have {inputs.shape[-1]} channels, the kernel expects {kernel.shape[2]}")
    return inputs, kernel
