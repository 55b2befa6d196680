"""Deformable convolution (Deformable ConvNets v1, and v2 with a modulation mask).

``deform_conv2d`` runs the compiled ``KerasDet>DeformConv2D`` kernel when the kerasdet op library is
loaded (see ``kerasdet.ops._kernels``) and otherwise a pure-TensorFlow twin that computes the same
numbers from builtin ops only, so a model traced under ``pure_tf()`` exports to a SavedModel that
needs no kerasdet library to be served.

Definition (NHWC). For output position (i, j), deformable group g and kernel tap t = u * kw + v,
the sample point is

    y = i * stride_h - pad_h + u * dilation_h + dy[i, j, g, t]
    x = j * stride_w - pad_w + v * dilation_w + dx[i, j, g, t]

read from the input channels of group g by bilinear interpolation in which every grid point outside
the map counts as 0, multiplied by mask[i, j, g, t] (v2, else 1), and the output is the sum over
taps and input channels weighted by ``kernel[u, v, c_in, c_out]``.
"""
import tensorflow as tf

from kerasdet.ops import _kernels

__all__ = ["deform_conv2d", "deform_conv2d_output_size"]

_OP_NAME = "KerasDet>DeformConv2D"
_GRAD_OP_NAME = "KerasDet>DeformConv2DGrad"
_FLOAT_TYPES = (tf.float32, tf.float16, tf.bfloat16, tf.float64)


def _pair(value, name, minimum):
    """An int or a pair of ints -> (a, b), each checked against ``minimum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"deform_conv2d: `{name}` must be an int or a pair of ints, "
                            f"got {value!r}") from None
        if len(pair) != 2:
            raise ValueError(f"deform_conv2d: `{name}` must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"deform_conv2d: `{name}` must be >= {minimum}, got {value!r}")
    return pair


def deform_conv2d_output_size(input_size, kernel_size, strides=1, padding=0, dilation=1):
    """(H_out, W_out) of a deformable (or plain) convolution; arguments as in ``deform_conv2d``."""
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    sh, sw = _pair(strides, "strides", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    h, w = input_size
    return ((h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
            (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1)


def _check_static(inputs, offsets, kernel, mask, strides, padding, dilation, groups):
    """Shape / dtype checks on what is known at trace time; errors name the argument."""
    for name, t in (("inputs", inputs), ("offsets", offsets), ("kernel", kernel), ("mask", mask)):
        if t is None:
            continue
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"deform_conv2d: `{name}` must be a floating tensor, got {t.dtype.name}")
        if t.shape.rank is not None and t.shape.rank != 4:
            raise ValueError(f"deform_conv2d: `{name}` must have rank 4, got shape {t.shape}")
    if groups < 1:
        raise ValueError(f"deform_conv2d: `deformable_groups` must be >= 1, got {groups}")
    kh, kw, c_in_k, _ = kernel.shape
    c_in = inputs.shape[-1]
    if c_in is not None and c_in_k is not None and c_in != c_in_k:
        raise ValueError(f"deform_conv2d: `kernel` expects {c_in_k} input channels but `inputs` has "
                         f"{c_in} (kernel shape {kernel.shape}, inputs shape {inputs.shape})")
    if c_in is not None and c_in % groups:
        raise ValueError(f"deform_conv2d: `inputs` channels ({c_in}) must be divisible by "
                         f"`deformable_groups` ({groups})")
    if kh is not None and kw is not None:
        taps = groups * kh * kw
        if offsets.shape[-1] is not None and offsets.shape[-1] != 2 * taps:
            raise ValueError(
                f"deform_conv2d: `offsets` must have 2 * deformable_groups * kh * kw = {2 * taps} "
                f"channels for a {kh}x{kw} kernel and {groups} group(s), got shape {offsets.shape}")
        if mask is not None and mask.shape[-1] is not None and mask.shape[-1] != taps:
            raise ValueError(
                f"deform_conv2d: `mask` must have deformable_groups * kh * kw = {taps} channels, "
                f"got shape {mask.shape}")
    h, w = inputs.shape[1], inputs.shape[2]
    if None not in (h, w, kh, kw):
        h_out, w_out = deform_conv2d_output_size((h, w), (kh, kw), strides, padding, dilation)
        if h_out < 1 or w_out < 1:
            raise ValueError(f"deform_conv2d: `inputs` of spatial size {h}x{w} is too small for a "
                             f"{kh}x{kw} kernel with padding {padding} and dilation {dilation}")
        for name, t in (("offsets", offsets), ("mask", mask)):
            if t is None:
                continue
            got = tuple(t.shape[1:3])
            if None not in got and got != (h_out, w_out):
                raise ValueError(f"deform_conv2d: `{name}` must be [B, {h_out}, {w_out}, ...] (the "
                                 f"output size), got shape {t.shape}")
            if t.shape[0] is not None and inputs.shape[0] is not None and t.shape[0] != inputs.shape[0]:
                raise ValueError(f"deform_conv2d: `{name}` batch size {t.shape[0]} differs from "
                                 f"`inputs` batch size {inputs.shape[0]}")


def deform_conv2d(inputs, offsets, kernel, mask=None, strides=1, padding=0, dilation=1,
                  deformable_groups=1):
    """Deformable 2-D convolution (DCN v1; v2 when ``mask`` is given), NHWC, no bias.

    Args:
      inputs: [B, H, W, C_in] float tensor.
      offsets: [B, H_out, W_out, 2 * G * kh * kw]; (dy, dx) of group g and tap t = u * kw + v at
        channels 2 * (g * kh * kw + t) and 2 * (g * kh * kw + t) + 1, in input pixels.
      kernel: [kh, kw, C_in, C_out] (Keras Conv2D layout).
      mask: optional [B, H_out, W_out, G * kh * kw] modulation scalars (DCN v2).
      strides, padding, dilation: int or (h, w) pair; padding is symmetric zero padding.
      deformable_groups: G, the number of channel groups with their own offsets; divides C_in.

    Returns:
      [B, H_out, W_out, C_out] in the dtype of ``inputs`` (float16 / bfloat16 are computed in float32).
    """
    inputs = tf.convert_to_tensor(inputs)
    offsets = tf.convert_to_tensor(offsets)
    kernel = tf.convert_to_tensor(kernel)
    mask = None if mask is None else tf.convert_to_tensor(mask)
    strides = _pair(strides, "strides", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    groups = int(deformable_groups)
    if kernel.shape.rank != 4:
        raise ValueError(f"deform_conv2d: `kernel` must be [kh, kw, C_in, C_out], got shape {kernel.shape}")
    _check_static(inputs, offsets, kernel, mask, strides, padding, dilation, groups)

    out_dtype = inputs.dtype
    # Both paths compute in float32 (accumulating half-precision inputs in float32).
    compute = tf.float64 if out_dtype == tf.float64 else tf.float32
    inputs, offsets, kernel = (tf.cast(t, compute) for t in (inputs, offsets, kernel))
    mask = None if mask is None else tf.cast(mask, compute)
    if compute == tf.float32 and _kernels.use_kernels():
        lib = _kernels.library()
        result = lib.keras_det_deform_conv2d(
            input=inputs, offset=offsets,
            mask=mask if mask is not None else tf.zeros([0], tf.float32), kernel=kernel,
            strides=list(strides), pads=list(padding), dilations=list(dilation),
            deformable_groups=groups, has_mask=mask is not None)
    else:
        result = _deform_conv2d_pure_tf(inputs, offsets, kernel, mask, strides, padding,
                                        dilation, groups)
    return tf.cast(result, out_dtype)


def _sample_columns(inputs, offsets, mask, kernel_size, strides, padding, dilation, groups):
    """Deformable im2col with builtin ops: [B, H_out, W_out, kh * kw * C_in] (tap-major columns)."""
    kh, kw = kernel_size
    taps = kh * kw
    shape = tf.shape(inputs)
    b, h, w, c_in = shape[0], shape[1], shape[2], shape[3]
    out_shape = tf.shape(offsets)
    h_out, w_out = out_shape[1], out_shape[2]
    dtype = inputs.dtype

    # Regular grid positions of every (output position, tap): [H_out, W_out, 1, K].
    i = tf.cast(tf.range(h_out) * strides[0] - padding[0], dtype)
    j = tf.cast(tf.range(w_out) * strides[1] - padding[1], dtype)
    u = tf.cast(tf.repeat(tf.range(kh), kw) * dilation[0], dtype)
    v = tf.cast(tf.tile(tf.range(kw), [kh]) * dilation[1], dtype)
    base_y = i[:, None, None, None] + u[None, None, None, :]
    base_x = j[None, :, None, None] + v[None, None, None, :]

    off = tf.reshape(offsets, [b, h_out, w_out, groups, taps, 2])
    y = base_y[None] + off[..., 0]  # [B, H_out, W_out, G, K]
    x = base_x[None] + off[..., 1]
    y0 = tf.floor(y)
    x0 = tf.floor(x)
    ly, lx = y - y0, x - x0
    y0 = tf.cast(y0, tf.int32)
    x0 = tf.cast(x0, tf.int32)

    # Group-major input: [B, G, H * W, C_in / G], gathered per (batch, group).
    cg = c_in // groups
    flat = tf.transpose(tf.reshape(inputs, [b, h * w, groups, cg]), [0, 2, 1, 3])

    def corner(yy, xx, weight):
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        index = tf.where(inside, yy * w + xx, 0)
        index = tf.reshape(tf.transpose(index, [0, 3, 1, 2, 4]), [b, groups, -1])
        weight = tf.where(inside, weight, tf.zeros_like(weight))
        weight = tf.reshape(tf.transpose(weight, [0, 3, 1, 2, 4]), [b, groups, -1, 1])
        return tf.gather(flat, index, batch_dims=2) * weight  # [B, G, H_out * W_out * K, cg]

    hy, hx = 1.0 - ly, 1.0 - lx
    if mask is not None:
        m = tf.reshape(mask, [b, h_out, w_out, groups, taps])
        hy_m, ly_m = hy * m, ly * m
    else:
        hy_m, ly_m = hy, ly
    sampled = (corner(y0, x0, hy_m * hx) + corner(y0, x0 + 1, hy_m * lx)
               + corner(y0 + 1, x0, ly_m * hx) + corner(y0 + 1, x0 + 1, ly_m * lx))
    sampled = tf.reshape(sampled, [b, groups, h_out, w_out, taps, cg])
    sampled = tf.transpose(sampled, [0, 2, 3, 4, 1, 5])  # channel index = g * cg + c, as in inputs
    return tf.reshape(sampled, [b, h_out, w_out, taps * c_in])


def _run_time_checks(inputs, offsets, kernel, mask, strides, padding, dilation, groups):
    """Graph assertions for what is only known at run time (the kernel checks the same in C++)."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    shape = tf.shape(inputs)
    h_out = (shape[1] + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // strides[0] + 1
    w_out = (shape[2] + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // strides[1] + 1
    taps = groups * kh * kw
    checks = [
        tf.debugging.assert_equal(shape[3] % groups, 0, message=(
            f"deform_conv2d: `inputs` channels must be divisible by `deformable_groups` ({groups})")),
        tf.debugging.assert_equal(shape[3], tf.shape(kernel)[2], message=(
            "deform_conv2d: `inputs` channels differ from the `kernel` input channels")),
        tf.debugging.assert_positive(tf.minimum(h_out, w_out), message=(
            "deform_conv2d: `inputs` is too small for the kernel, padding and dilation")),
    ]
    for name, t, channels in (("offsets", offsets, 2 * taps), ("mask", mask, taps)):
        if t is not None:
            want = tf.stack([shape[0], h_out, w_out, channels])
            checks.append(tf.debugging.assert_equal(tf.shape(t), want, message=(
                f"deform_conv2d: `{name}` must be [B, H_out, W_out, {channels}] (B and the output "
                "size of `inputs`)")))
    return checks


def _deform_conv2d_pure_tf(inputs, offsets, kernel, mask, strides, padding, dilation, groups):
    """Builtin-op twin of the compiled kernel (gather-based bilinear sampling + one matmul)."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    if kh is None or kw is None:
        raise ValueError(f"deform_conv2d: the spatial size of `kernel` must be known, got shape "
                         f"{kernel.shape}")
    with tf.control_dependencies(
            _run_time_checks(inputs, offsets, kernel, mask, strides, padding, dilation, groups)):
        inputs = tf.identity(inputs)
    columns = _sample_columns(inputs, offsets, mask, (kh, kw), strides, padding, dilation, groups)
    c_out = tf.shape(kernel)[3]
    # kernel [kh, kw, C_in, C_out] flattens to the same tap-major order as the columns.
    weights = tf.reshape(kernel, [-1, c_out])
    return tf.tensordot(columns, weights, axes=[[3], [0]])


def _deform_conv2d_grad(op, grad):
    """Gradient of the compiled op through its own gradient kernel (one pass for all four inputs)."""
    grads = _kernels.library().keras_det_deform_conv2d_grad(
        input=op.inputs[0], offset=op.inputs[1], mask=op.inputs[2], kernel=op.inputs[3],
        grad_output=grad, strides=op.get_attr("strides"), pads=op.get_attr("pads"),
        dilations=op.get_attr("dilations"), deformable_groups=op.get_attr("deformable_groups"),
        has_mask=op.get_attr("has_mask"))
    return list(grads)


_kernels.register_gradients({_OP_NAME: _deform_conv2d_grad})
