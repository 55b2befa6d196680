"""Stride-1 3x3 convolutions as Winograd F(4x4, 3x3) or F(6x6, 3x3) products, for float32 on the CPU.

Lavin & Gray ("Fast Algorithms for Convolutional Neural Networks", 2016) compute a 4x4 block of a
3x3 correlation from its 6x6 input window d as Y = A^T [(G g G^T) * (B^T d B)] A: 36 products per
channel pair instead of 144. Over a whole layer the products become 36 independent matrix products
[tiles, Ci] @ [Ci, Co], which TensorFlow's MatMul (oneDNN) runs at the machine's GEMM rate, and the
transforms around them are the compiled kernels of ``custom_ops/winograd`` (memory-bound passes).
All the pieces are linear, so the gradients are again transforms around matrix products (the
kernels' adjoints are registered below): training gains as well.

F(6x6, 3x3) (8x8 windows, 64 products per 36 outputs) does 21 % fewer products still, at twice the
rounding error (~2e-5 of the output's range against ~1e-5, float32); `winograd_large_tiles` picks it
where the padding to whole tiles leaves the saving and the products stay long enough.

Where it pays (``python benchmarks/winograd.py``): on the 2-core AMD EPYC host of this change, the
FPN's P2 3x3 convolution (1 x 200 x 304 x 256 -> 256, with bias and ReLU) took 0.42x (4x4) / 0.32x
(6x6) the time of TensorFlow's float32 convolution (0.33x / 0.25x with both gradients, batch 2).
It is not used for bfloat16
/ float16: rounding the transformed tiles to 8 mantissa bits left errors of ~1e-1 of the output's
range with F(4x4, 3x3) (the transforms multiply values by up to 25 before the products and the
output transform cancels them again), and F(2x2, 3x3), accurate enough, was no faster than oneDNN's
bfloat16 convolution there. Nor on a GPU (cuDNN picks its own algorithms), under XLA (the kernels
have no XLA form), or under ``_kernels.pure_tf()``.
`winograd_applies` is that rule; `kerasdet.layers.WinogradConv2D` asks it at trace time.
"""
import functools

import numpy as np
import tensorflow as tf

from kerasdet.ops import _kernels
from kerasdet.ops.conv_args import checked_conv_arguments
from kerasdet.ops.xla import in_xla_context

__all__ = ["winograd_conv3x3", "winograd_applies", "winograd_pays", "winograd_large_tiles",
           "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_TILES", "WINOGRAD6_MIN_TILES"]

# Filter transforms G (Lavin & Gray, interpolation points 0, +-1 / 0, +-1, +-2 / 0, +-1, +-2, +-1/2);
# B^T and A^T live in the C++ kernels. The tests check the composition against the correlation's
# own definition.
_G = {
    2: np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
    4: np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
    6: np.array([[1, 0, 0], [-2 / 9, -2 / 9, -2 / 9], [-2 / 9, 2 / 9, -2 / 9],
                 [1 / 90, 1 / 45, 2 / 45], [1 / 90, -1 / 45, 2 / 45],
                 [32 / 45, 16 / 45, 8 / 45], [32 / 45, -16 / 45, 8 / 45], [0, 0, 1]], np.float64),
}

# Below this many input or output channels, or (inference only) this many 4x4 output tiles per
# call, the matrix products are too thin to win over oneDNN's direct convolution.
# benchmarks/winograd.py, float32, 2-core AMD EPYC, time over TensorFlow's at 800 x 1216 (ResNet-50
# layer1..4 = 64, 128, 256, 512 channels, 3800 / 950 / 247 / 70 tiles per image):
#   inference (batch 1, + bias + ReLU): layer1 1.24, layer2 0.81, layer3 0.58, layer4 0.69;
#     FPN / RPN 3x3 at P2 / P3 / P4 0.48 / 0.57 / 0.61; the mask head (100 RoIs of 14 x 14) 0.74;
#     32 channels 1.53;
#   training (batch 2, forward and both gradients): layer1 0.96, layer2 0.58, layer3 0.43,
#     layer4 0.49; P2 / P3 / P4 0.41 / 0.35 / 0.46; the mask head 0.57; 32 channels 1.45.
# Fewer tiles than layer4's 70 were not measured at inference. In training, where oneDNN's
# convolution gradients are the slower part, the tile rule is not applied (smallest measured:
# layer4's 140 tiles at batch 2).
# With the unrolled transforms of later (below), 64 channels pays as well (layer1: inference 0.85
# / 0.61 with 4x4 / 6x6 tiles, training 0.62 / 0.55), 32 channels at best in training (0.84); the
# channel rule was left at 128 so far: lowering it moves every 64-channel tiny model of the tests
# onto Winograd, and in R50-FPN only layer1's three frozen 3x3 layers would gain.
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_TILES = 64

# F(6x6, 3x3) forms 64 products per 36 outputs where F(4x4, 3x3) forms 36 per 16 (21 % fewer), but
# pads more to whole tiles and splits the work into 64 shorter matrix products. Same benchmark,
# after the transforms became compile-time-unrolled kernels, time over TensorFlow's, F(4x4) / F(6x6):
#   inference (batch 1): P2 0.42 / 0.32, P3 0.39 / 0.35, layer2 0.71 / 0.63, layer3 (117 6x6 tiles)
#     0.40 / 0.44, layer4 0.60 / 0.74, P4 0.47 / 0.49, the mask head (14 x 14 RoIs: no fewer
#     products) 0.54 / 0.58;
#   training (batch 2): P2 0.33 / 0.25, P3 0.33 / 0.29, layer2 0.42 / 0.37, layer3 (234 tiles)
#     0.32 / 0.30, layer4 (70 tiles) 0.48 / 0.52, the mask head 0.46 / 0.49.
# Hence F(6x6) when it saves at least a tenth of the products on at least this many 6x6 tiles.
WINOGRAD6_MIN_TILES = 200


@functools.lru_cache(maxsize=None)
def _gpu_visible():
    return bool(tf.config.list_logical_devices("GPU"))


def winograd_applies(dtype, kernel_size, strides=(1, 1), dilation_rate=(1, 1), groups=1,
                     channels_in=None, channels_out=None):
    """Whether a convolution with these settings, traced now, runs as `winograd_conv3x3` (given
    enough tiles: `winograd_pays`)."""
    return (tf.as_dtype(dtype) == tf.float32 and tuple(kernel_size) == (3, 3)
            and tuple(strides) == (1, 1) and tuple(dilation_rate) == (1, 1) and groups == 1
            and channels_in is not None and channels_in >= WINOGRAD_MIN_CHANNELS
            and channels_out is not None and channels_out >= WINOGRAD_MIN_CHANNELS
            and _kernels.use_kernels() and not in_xla_context() and not _gpu_visible())


def _sizes(inputs):
    """(n, h, w) of `inputs`: Python ints when known at trace time, else scalar tensors."""
    n, h, w = inputs.shape[:3]
    if None in (n, h, w):
        size = tf.shape(inputs)
        return size[0], size[1], size[2]
    return n, h, w


def _tile_count(n, h, w, tile):
    return n * ((h + tile - 1) // tile) * ((w + tile - 1) // tile)


def winograd_pays(inputs, tile=4, training=False):
    """Whether the output of `inputs` has at least `WINOGRAD_MIN_TILES` tiles (always true for a
    layer being trained, ``training``): a Python bool when the batch and spatial sizes are known at
    trace time, else a scalar bool tensor (see `select`)."""
    if training:
        return True
    return _tile_count(*_sizes(inputs), tile) >= WINOGRAD_MIN_TILES


def winograd_large_tiles(inputs):
    """Whether a 3x3 convolution of `inputs` (output about the input's size) should take F(6x6, 3x3)
    rather than F(4x4, 3x3): at least `WINOGRAD6_MIN_TILES` 6x6 tiles, and at most 0.9x the products
    of 4x4 tiles after both pad to whole tiles. A Python bool when the sizes are known at trace time,
    else a scalar bool tensor (see `select`)."""
    sizes = _sizes(inputs)
    large, small = _tile_count(*sizes, 6), _tile_count(*sizes, 4)
    enough, fewer = large >= WINOGRAD6_MIN_TILES, 64 * large * 10 <= 36 * small * 9
    return enough and fewer if isinstance(large, int) else tf.logical_and(enough, fewer)


def select(pays, winograd_fn, direct_fn):
    """winograd_fn() or direct_fn() by `winograd_pays`: chosen at trace time when it is a bool, by a
    tf.cond at run time otherwise (images whose size is only known then)."""
    if isinstance(pays, bool):
        return winograd_fn() if pays else direct_fn()
    return tf.cond(pays, winograd_fn, direct_fn)


def _padding(padding):
    """(top, bottom, left, right) of a 3x3 stride-1 convolution."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return 1, 1, 1, 1
        if mode == "VALID":
            return 0, 0, 0, 0
        raise ValueError(f"winograd_conv3x3: padding must be 'SAME', 'VALID' or four ints, got {padding!r}")
    pads = tuple(int(p) for p in padding)
    if len(pads) != 4 or min(pads) < 0:
        raise ValueError(f"winograd_conv3x3: padding must be 'SAME', 'VALID' or four ints >= 0 "
                         f"(top, bottom, left, right), got {padding!r}")
    return pads


def filter_transform(kernel, tile=4):
    """G g G^T of a [3, 3, Ci, Co] kernel as [(tile + 2)^2, Ci, Co], computed in float32.

    One [(tile + 2)^2, 9] @ [9, Ci * Co] product with the Kronecker product G (x) G: a three-operand
    einsum of the same took ~10 ms per 256 x 256 layer (oneDNN's einsum), the product well under 1.
    """
    g = _G[tile]
    r = tile + 2
    kernel = tf.cast(kernel, tf.float32)
    shape = tf.shape(kernel)
    u = tf.linalg.matmul(tf.constant(np.kron(g, g), tf.float32), tf.reshape(kernel, [9, -1]))
    return tf.reshape(u, [r * r, shape[2], shape[3]])


def winograd_conv3x3(inputs, kernel, padding="SAME", tile=4, bias=None, relu=False):
    """``tf.nn.conv2d(inputs, kernel, 1, padding)`` for a [3, 3, Ci, Co] kernel on channels-last
    [B, H, W, Ci] inputs, computed as Winograd F(tile x tile, 3x3) (tile 4; 6: fewer products, twice
    the rounding error; 2: fewer operations saved, smaller rounding errors). ``padding``: "SAME",
    "VALID" or (top, bottom, left, right). ``bias`` ([Co]) and ``relu`` are applied in the output
    transform's pass (a layer's epilogue). Needs the compiled kernels (`winograd_applies` says when to call it); differentiable."""
    lib = _kernels.library()
    if lib is None:
        raise _kernels.KernelsUnavailableError(
            "winograd_conv3x3 needs the compiled kerasdet kernels (build them with `make kernels`)")
    inputs, kernel = checked_conv_arguments("winograd_conv3x3", inputs, kernel, 3)
    if tile not in _G:
        raise ValueError(f"winograd_conv3x3: tile must be 2, 4 or 6, got {tile!r}")
    if bias is None:
        bias = tf.zeros([0], inputs.dtype)
    else:
        bias = tf.convert_to_tensor(bias, dtype_hint=inputs.dtype)
        if bias.dtype != inputs.dtype:
            raise TypeError(f"winograd_conv3x3: inputs are {inputs.dtype.name} but the bias is {bias.dtype.name}")
        if bias.shape.rank != 1 or (bias.shape[0] is not None and bias.shape[0] != kernel.shape[3]):
            raise ValueError(f"winograd_conv3x3: the bias must have shape [{kernel.shape[3]}], got {bias.shape}")
    top, bottom, left, right = _padding(padding)
    tiles = lib.kerasdet_winograd_input_transform(inputs, tile=tile, pad_top=top, pad_bottom=bottom,
                                                  pad_left=left, pad_right=right)
    products = tf.linalg.matmul(tiles, tf.cast(filter_transform(kernel, tile), inputs.dtype))
    shape = tf.shape(inputs)
    size = tf.stack([shape[0], shape[1] + top + bottom - 2, shape[2] + left + right - 2])
    return lib.kerasdet_winograd_output_transform(products, size, bias, tile=tile, relu=bool(relu))


def _register_gradients():
    def attrs(op, names):
        return {n: op.get_attr(n) for n in names}

    pads = ("tile", "pad_top", "pad_bottom", "pad_left", "pad_right")

    def lib():
        return _kernels.library()

    def input_transform_grad(op, grad):
        return [lib().kerasdet_winograd_input_transform_grad(
            grad=grad, input_shape=tf.shape(op.inputs[0]), **attrs(op, pads))]

    def input_transform_grad_grad(op, grad):  # the adjoint of the adjoint is the transform
        return [lib().kerasdet_winograd_input_transform(grad, **attrs(op, pads)), None]

    def output_transform_grad(op, grad):
        if op.get_attr("relu"):  # one pass, where a compare, a cast and a product took three
            grad = tf.raw_ops.ReluGrad(gradients=grad, features=op.outputs[0])
        bias = op.inputs[2]
        grad_bias = None if bias.shape[0] == 0 else tf.reduce_sum(grad, axis=[0, 1, 2])
        return [lib().kerasdet_winograd_output_transform_grad(grad, tile=op.get_attr("tile")), None,
                grad_bias]

    def output_transform_grad_grad(op, grad):
        shape = tf.shape(op.inputs[0])
        return [lib().kerasdet_winograd_output_transform(grad, shape[:3], tf.zeros([0], grad.dtype),
                                                         tile=op.get_attr("tile"))]

    _kernels.register_gradients({
        "KerasDet>WinogradInputTransform": input_transform_grad,
        "KerasDet>WinogradInputTransformGrad": input_transform_grad_grad,
        "KerasDet>WinogradOutputTransform": output_transform_grad,
        "KerasDet>WinogradOutputTransformGrad": output_transform_grad_grad})


_register_gradients()
