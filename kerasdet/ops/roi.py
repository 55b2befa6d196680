"""RoI pooling ops: RoIPool, RoIAlign, position-sensitive and deformable RoI pooling.

Each op runs the compiled ``KerasDet>...`` kernel when the kerasdet op library is loaded (see
``kerasdet.ops._kernels``) and otherwise a pure-TensorFlow twin built from builtin ops only, which
computes the same numbers (autodiff gives its gradients). The choice is made at trace time through
``_kernels.use_kernels()``, so a model traced under ``_kernels.pure_tf()`` exports to a SavedModel
that TF Serving loads without kerasdet.

Common arguments (NHWC):
  features: [B, H, W, C] float32 (float16 / bfloat16 / float64 are computed in float32 and cast back).
  boxes: [R, 4] (x1, y1, x2, y2) in input-image pixels.
  box_indices: [R] int32, the batch image of each box.
  output_size: int or (ph, pw).
  spatial_scale: feature pixels per image pixel (1 / stride).
Output: [R, ph, pw, C_out] with C_out = C, or C / (ph * pw) for the position-sensitive ops, whose
output channel c of bin (i, j) reads input channel (c * ph + i) * pw + j (R-FCN).

Definitions (the compiled kernels and the fallbacks implement exactly these):
  * roi_pool (Fast R-CNN): x1..y2 scaled then rounded half away from zero; the RoI is
    max(x2 - x1 + 1, 1) pixels wide (inclusive end); bin j spans columns
    [floor(j * bw) + x1, ceil((j + 1) * bw) + x1) clipped to the map, bw = width / pw; the bin's
    maximum, or 0 for an empty bin. The gradient goes to the arg-max pixel.
  * ps_roi_pool: the average (average voting) over bin (i, j)'s pixels of the bin's channel group;
    an empty bin gives 0. Two bin rules, in float32 with every product and sum rounded on its own:
    - bin_rule="rfcn" (default; R-FCN's Caffe layer psroi_pooling_layer.cu): the corners are
      rounded half away from zero in image pixels, then scaled, the end one image pixel further
      (inclusive end): x1' = round(x1) * scale, x2' = (round(x2) + 1) * scale; the RoI is
      w = max(x2' - x1', 0.1) feature pixels wide and bin j spans columns
      [floor(x1' + j * bw), ceil(x1' + (j + 1) * bw)) clipped to [0, W], bw = w / pw.
    - bin_rule="torchvision" (torchvision.ops.ps_roi_pool): x1' = round(x1 * scale),
      x2' = round(x2 * scale) (half away from zero), w = max(x2' - x1', 1) (no inclusive end); bin j
      spans [floor(j * bw) + x1', ceil((j + 1) * bw) + x1') clipped to [0, W - 1], as torchvision's
      forward pass clips (its last row and column never count; its backward pass clips to W, so
      its gradient differs from the derivative of its output on bins that reach them; ours is the
      derivative).
    Rows the same with y, h, ph and H.
  * roi_align (Mask R-CNN, Detectron2 ROIAlign): corners scaled, minus 0.5 when aligned; unaligned
    RoIs are at least 1x1; bin (i, j) of size (h / ph, w / pw) holds grid_h x grid_w samples at
    the centers of a regular sub-grid, grid = sampling_ratio, or ceil(bin size) when
    sampling_ratio <= 0 (an empty RoI then has no sample and gives 0); each sample is bilinear,
    reads 0 when more than one pixel outside the map and clamps to the border otherwise; the bin
    value is the sum of samples divided by max(grid_h * grid_w, 1).
  * ps_roi_align: roi_align's samples (always aligned) on the position-sensitive channels.
  * deform_roi_pool / deform_ps_roi_pool (Deformable ConvNets): roi_align / ps_roi_align in which
    the samples of bin (i, j) move by (gamma * w * offsets[r, i, j, 2g], gamma * h *
    offsets[r, i, j, 2g + 1]) feature pixels, (w, h) the RoI size in feature pixels: the
    normalized offsets are stored as (dx, dy), G = offsets.shape[-1] / 2 groups split the output
    channels into G consecutive blocks with their own offsets (G = 1 usually). With zero offsets
    they equal roi_align / ps_roi_align.
"""
import tensorflow as tf

from kerasdet.ops import _kernels
from kerasdet.ops.xla import in_xla_context, unsupported

__all__ = ["roi_pool", "roi_align", "ps_roi_pool", "ps_roi_align", "deform_roi_pool",
           "deform_ps_roi_pool"]

_FLOAT_TYPES = (tf.float32, tf.float16, tf.bfloat16, tf.float64)


# ----------------------------------------------------------------------------------------------
# Argument checking (errors name the argument and the op)
# ----------------------------------------------------------------------------------------------

def _output_size(op, output_size):
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        size = (output_size, output_size)
    else:
        try:
            size = tuple(int(v) for v in output_size)
        except TypeError:
            raise TypeError(f"{op}: `output_size` must be an int or a pair of ints, "
                            f"got {output_size!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{op}: `output_size` must be a positive int or pair, got {output_size!r}")
    return size


def _float_input(op, name, value, rank, last=None):
    value = tf.convert_to_tensor(value)
    if value.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{op}: `{name}` must be a floating tensor (float32, float16, bfloat16), "
                        f"got {value.dtype.name}")
    if value.shape.rank is not None and value.shape.rank != rank:
        raise ValueError(f"{op}: `{name}` must have rank {rank}, got shape {value.shape}")
    if last is not None and value.shape.rank is not None and value.shape[-1] not in (None, last):
        raise ValueError(f"{op}: `{name}` must have {last} values in its last axis, "
                         f"got shape {value.shape}")
    return value


def _prepare(op, features, boxes, box_indices, output_size, position_sensitive, offsets=None):
    """Checked float32 / int32 inputs; returns (features, boxes, box_indices, offsets, ph, pw,
    out_dtype)."""
    features = _float_input(op, "features", features, 4)
    boxes = _float_input(op, "boxes", boxes, 2, last=4)
    box_indices = tf.convert_to_tensor(box_indices)
    if not box_indices.dtype.is_integer:
        raise TypeError(f"{op}: `box_indices` must be an integer tensor, got {box_indices.dtype.name}")
    if box_indices.shape.rank is not None and box_indices.shape.rank != 1:
        raise ValueError(f"{op}: `box_indices` must be [R], got shape {box_indices.shape}")
    if (boxes.shape[0] is not None and box_indices.shape.rank == 1
            and box_indices.shape[0] is not None and boxes.shape[0] != box_indices.shape[0]):
        raise ValueError(f"{op}: `boxes` has {boxes.shape[0]} rows but `box_indices` has "
                         f"{box_indices.shape[0]}")
    ph, pw = _output_size(op, output_size)
    channels = features.shape[-1]
    if position_sensitive and channels is not None and channels % (ph * pw):
        raise ValueError(f"{op}: `features` has {channels} channels, which is not divisible by "
                         f"output height * width = {ph * pw} as position-sensitive pooling needs")
    if offsets is not None:
        offsets = _float_input(op, "offsets", offsets, 4)
        shape = offsets.shape
        if shape[1] not in (None, ph) or shape[2] not in (None, pw) or (
                shape[3] is not None and (shape[3] < 2 or shape[3] % 2)):
            raise ValueError(f"{op}: `offsets` must be [R, {ph}, {pw}, 2 * groups], got shape {shape}")
        if shape[3] is not None and channels is not None:
            out_channels = channels // (ph * pw) if position_sensitive else channels
            if out_channels % (shape[3] // 2):
                raise ValueError(f"{op}: `offsets` has {shape[3] // 2} groups, which do not divide "
                                 f"the {out_channels} output channels")
        offsets = tf.cast(offsets, tf.float32)
    out_dtype = features.dtype
    # Mixed precision: the kernels are built for float32 only, and the fallbacks' bilinear weights
    # and bin averages want float32 too, so half-precision features (and offsets) are cast to
    # float32 around the call and the result back to their dtype by the op; tf.cast's gradient
    # returns the gradients in the input dtype. Boxes are always float32.
    return (tf.cast(features, tf.float32), tf.cast(boxes, tf.float32),
            tf.cast(box_indices, tf.int32), offsets, ph, pw, out_dtype)


def _checked_fallback_inputs(op, features, boxes, box_indices, ph, pw, position_sensitive):
    """The kernels' run-time checks, as builtin assertion ops (so the portable graph keeps them)."""
    batch = tf.shape(features)[0]
    checks = [
        tf.debugging.assert_non_negative(
            box_indices, message=f"{op}: box_indices must be >= 0 (out of range)"),
        tf.debugging.assert_less(
            box_indices, batch,
            message=f"{op}: box_indices is out of range: it must be < the batch size of features"),
    ]
    if position_sensitive:
        checks.append(tf.debugging.assert_equal(
            tf.shape(features)[3] % (ph * pw), 0,
            message=f"{op}: features channels must be divisible by output height * width"))
    with tf.control_dependencies(checks):
        boxes = tf.debugging.assert_all_finite(boxes, f"{op}: boxes has a non-finite coordinate")
        return tf.identity(box_indices), boxes


PS_BIN_RULES = ("rfcn", "torchvision")


def check_ps_bin_rule(op, bin_rule):
    """`bin_rule` of ps_roi_pool, checked (the error names the argument)."""
    if bin_rule not in PS_BIN_RULES:
        raise ValueError(f"{op}: `bin_rule` must be one of {PS_BIN_RULES}, got {bin_rule!r}")
    return bin_rule


def _kernel(name):
    return getattr(_kernels.library(), name)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def roi_pool(features, boxes, box_indices, output_size, spatial_scale=1.0):
    """Fast R-CNN RoI max pooling (see the module docstring for the exact definition).

    Returns [R, ph, pw, C] in the dtype of ``features``.
    """
    features, boxes, box_indices, _, ph, pw, dtype = _prepare(
        "roi_pool", features, boxes, box_indices, output_size, False)
    if _kernels.use_kernels():
        out, _ = _kernel("kerasdet_roi_pool")(
            features=features, boxes=boxes, box_indices=box_indices, pooled_height=ph,
            pooled_width=pw, spatial_scale=float(spatial_scale))
    else:
        out = _integer_bin_pool_tf("roi_pool", features, boxes, box_indices, ph, pw,
                                   float(spatial_scale), position_sensitive=False)
    return tf.cast(out, dtype)


def ps_roi_pool(features, boxes, box_indices, output_size, spatial_scale=1.0, bin_rule="rfcn"):
    """R-FCN position-sensitive RoI pooling with average voting.

    Args:
      bin_rule: "rfcn" (R-FCN's reference layer, the default) or "torchvision"
        (torchvision.ops.ps_roi_pool's pixel bins); see the module docstring.
      Others as in the module docstring.

    Returns [R, ph, pw, C / (ph * pw)] in the dtype of ``features``.
    """
    bin_rule = check_ps_bin_rule("ps_roi_pool", bin_rule)
    features, boxes, box_indices, _, ph, pw, dtype = _prepare(
        "ps_roi_pool", features, boxes, box_indices, output_size, True)
    if _kernels.use_kernels():
        out = _kernel("kerasdet_ps_roi_pool")(
            features=features, boxes=boxes, box_indices=box_indices, pooled_height=ph,
            pooled_width=pw, spatial_scale=float(spatial_scale), bin_rule=bin_rule)
    else:
        out = _integer_bin_pool_tf("ps_roi_pool", features, boxes, box_indices, ph, pw,
                                   float(spatial_scale), position_sensitive=True, rule=bin_rule)
    return tf.cast(out, dtype)


def roi_align(features, boxes, box_indices, output_size, spatial_scale=1.0, sampling_ratio=0,
              aligned=True):
    """Mask R-CNN RoIAlign (Detectron2 semantics; ``aligned=True`` shifts by half a pixel).

    Returns [R, ph, pw, C] in the dtype of ``features``.
    """
    features, boxes, box_indices, _, ph, pw, dtype = _prepare(
        "roi_align", features, boxes, box_indices, output_size, False)
    if _kernels.use_kernels():
        out = _kernel("kerasdet_roi_align")(
            features=features, boxes=boxes, box_indices=box_indices, pooled_height=ph,
            pooled_width=pw, spatial_scale=float(spatial_scale),
            sampling_ratio=int(sampling_ratio), aligned=bool(aligned))
    else:
        out = _bilinear_pool_tf("roi_align", features, boxes, box_indices, None, ph, pw,
                                float(spatial_scale), int(sampling_ratio), bool(aligned),
                                position_sensitive=False, gamma=0.0)
    return tf.cast(out, dtype)


def ps_roi_align(features, boxes, box_indices, output_size, spatial_scale=1.0, sampling_ratio=0):
    """Position-sensitive RoIAlign: R-FCN channels, RoIAlign samples (half-pixel shifted).

    Returns [R, ph, pw, C / (ph * pw)] in the dtype of ``features``.
    """
    features, boxes, box_indices, _, ph, pw, dtype = _prepare(
        "ps_roi_align", features, boxes, box_indices, output_size, True)
    if _kernels.use_kernels():
        out = _kernel("kerasdet_ps_roi_align")(
            features=features, boxes=boxes, box_indices=box_indices, pooled_height=ph,
            pooled_width=pw, spatial_scale=float(spatial_scale),
            sampling_ratio=int(sampling_ratio))
    else:
        out = _bilinear_pool_tf("ps_roi_align", features, boxes, box_indices, None, ph, pw,
                                float(spatial_scale), int(sampling_ratio), True,
                                position_sensitive=True, gamma=0.0)
    return tf.cast(out, dtype)


def deform_roi_pool(features, boxes, box_indices, offsets, output_size, spatial_scale=1.0,
                    sampling_ratio=0, aligned=True, gamma=0.1):
    """Deformable RoI pooling (Deformable ConvNets): RoIAlign bins shifted by learned offsets.

    Args:
      offsets: [R, ph, pw, 2 * G] normalized offsets (dx, dy) per bin (and group); bin (i, j)
        moves by gamma * (dx * w, dy * h), (w, h) the RoI size in feature pixels.
      gamma: the offset scale (0.1 in the paper).
      Others as in ``roi_align``.

    Returns [R, ph, pw, C]; gradients flow to ``features`` and ``offsets``.
    """
    features, boxes, box_indices, offsets, ph, pw, dtype = _prepare(
        "deform_roi_pool", features, boxes, box_indices, output_size, False, offsets)
    if _kernels.use_kernels():
        out = _kernel("kerasdet_deform_roi_pool")(
            features=features, boxes=boxes, box_indices=box_indices, offsets=offsets,
            pooled_height=ph, pooled_width=pw, spatial_scale=float(spatial_scale),
            sampling_ratio=int(sampling_ratio), aligned=bool(aligned), gamma=float(gamma))
    else:
        out = _bilinear_pool_tf("deform_roi_pool", features, boxes, box_indices, offsets, ph, pw,
                                float(spatial_scale), int(sampling_ratio), bool(aligned),
                                position_sensitive=False, gamma=float(gamma))
    return tf.cast(out, dtype)


def deform_ps_roi_pool(features, boxes, box_indices, offsets, output_size, spatial_scale=1.0,
                       sampling_ratio=0, gamma=0.1):
    """Deformable position-sensitive RoI pooling (Deformable ConvNets' R-FCN head).

    Args:
      offsets: [R, ph, pw, 2 * G] normalized offsets (dx, dy); G groups of output channels
        (G = 1, or the number of classes for per-class offsets).
      Others as in ``ps_roi_align`` and ``deform_roi_pool``.

    Returns [R, ph, pw, C / (ph * pw)]; gradients flow to ``features`` and ``offsets``.
    """
    features, boxes, box_indices, offsets, ph, pw, dtype = _prepare(
        "deform_ps_roi_pool", features, boxes, box_indices, output_size, True, offsets)
    if _kernels.use_kernels():
        out = _kernel("kerasdet_deform_ps_roi_pool")(
            features=features, boxes=boxes, box_indices=box_indices, offsets=offsets,
            pooled_height=ph, pooled_width=pw, spatial_scale=float(spatial_scale),
            sampling_ratio=int(sampling_ratio), gamma=float(gamma))
    else:
        out = _bilinear_pool_tf("deform_ps_roi_pool", features, boxes, box_indices, offsets, ph,
                                pw, float(spatial_scale), int(sampling_ratio), True,
                                position_sensitive=True, gamma=float(gamma))
    return tf.cast(out, dtype)


# ----------------------------------------------------------------------------------------------
# Pure-TensorFlow fallbacks
# ----------------------------------------------------------------------------------------------
# Written with gathers rather than tf.image.crop_and_resize: crop_and_resize samples one fixed grid
# per crop, while these ops need a per-RoI sample count (sampling_ratio <= 0), RoIAlign's border
# rule (clamp within one pixel, 0 beyond), per-bin channel groups (R-FCN) and per-bin shifts
# (deformable), none of which it can express without changing the numbers.

def _planes(features, groups, ph, pw, position_sensitive):
    """Features as gatherable rows: [B * P * G * H * W, C_out / G] with P bin planes (ph * pw for
    the position-sensitive ops, else 1) and G offset groups; returns (rows, P)."""
    shape = tf.shape(features)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    bins = ph * pw
    if position_sensitive:
        # input channel ((g * cpg + c') * ph + i) * pw + j
        x = tf.reshape(features, [b, h, w, groups, -1, bins])
        x = tf.transpose(x, [0, 5, 3, 1, 2, 4])  # [B, P, G, H, W, cpg]
        planes = bins
    else:
        planes = 1
        if groups == 1:
            return tf.reshape(features, [-1, c]), planes
        x = tf.transpose(tf.reshape(features, [b, h, w, groups, -1]), [0, 3, 1, 2, 4])
    return tf.reshape(x, [-1, tf.shape(x)[-1]]), planes


def _roi_align_axis(coord, size):
    """One axis of RoIAlign's bilinear rule: (low, high, weight_low, weight_high, inside)."""
    size_f = tf.cast(size, coord.dtype)
    inside = (coord >= -1.0) & (coord <= size_f)
    c = tf.maximum(coord, 0.0)
    low = tf.cast(tf.floor(c), tf.int32)
    at_end = low >= size - 1
    low = tf.where(at_end, size - 1, low)
    high = tf.where(at_end, size - 1, low + 1)
    c = tf.where(at_end, tf.cast(low, c.dtype), c)
    frac = c - tf.cast(low, c.dtype)
    # Indices stay gatherable where the sample is dropped (NaN / huge coordinates).
    low = tf.clip_by_value(low, 0, tf.maximum(size - 1, 0))
    high = tf.clip_by_value(high, 0, tf.maximum(size - 1, 0))
    return low, high, 1.0 - frac, frac, inside


def _bilinear_pool_tf(op, features, boxes, box_indices, offsets, ph, pw, spatial_scale,
                      sampling_ratio, aligned, position_sensitive, gamma):
    """RoIAlign / PSRoIAlign / deformable (PS) RoI pooling with builtin ops only."""
    if sampling_ratio <= 0 and in_xla_context():
        raise unsupported(f"{op} with sampling_ratio=0 (the adaptive sample grid's size depends on "
                          "the boxes)", "A fixed sampling_ratio (e.g. 2, torchvision's) compiles.")
    box_indices, boxes = _checked_fallback_inputs(op, features, boxes, box_indices, ph, pw,
                                                  position_sensitive)
    shape = tf.shape(features)
    height, width = shape[1], shape[2]
    groups = 1 if offsets is None else offsets.shape[-1] // 2
    rows, planes = _planes(features, groups, ph, pw, position_sensitive)
    cpg = tf.shape(rows)[-1]
    num_rois = tf.shape(boxes)[0]

    shift = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * spatial_scale - shift
    y1 = boxes[:, 1] * spatial_scale - shift
    x2 = boxes[:, 2] * spatial_scale - shift
    y2 = boxes[:, 3] * spatial_scale - shift
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = tf.maximum(roi_w, 1.0), tf.maximum(roi_h, 1.0)
    bin_h, bin_w = _divide(roi_h, ph), _divide(roi_w, pw)
    if sampling_ratio > 0:
        grid_h = tf.fill([num_rois], sampling_ratio)
        grid_w = grid_h
        max_h = max_w = sampling_ratio
    else:
        grid_h = tf.cast(tf.maximum(tf.math.ceil(bin_h), 0.0), tf.int32)
        grid_w = tf.cast(tf.maximum(tf.math.ceil(bin_w), 0.0), tf.int32)
        max_h = tf.reduce_max(tf.concat([grid_h, [0]], 0))
        max_w = tf.reduce_max(tf.concat([grid_w, [0]], 0))
    inv_count = 1.0 / tf.cast(tf.maximum(grid_h * grid_w, 1), tf.float32)
    gh_f = tf.cast(tf.maximum(grid_h, 1), tf.float32)
    gw_f = tf.cast(tf.maximum(grid_w, 1), tf.float32)

    # Sample coordinates: y [R, ph, 1|pw, 1|G, Sy], x [R, 1|ph, pw, 1|G, Sx].
    iy = tf.cast(tf.range(max_h), tf.float32)
    ix = tf.cast(tf.range(max_w), tf.float32)
    bi = tf.cast(tf.range(ph), tf.float32)
    bj = tf.cast(tf.range(pw), tf.float32)
    y = (y1[:, None, None] + bi[None, :, None] * bin_h[:, None, None]
         + (iy[None, None, :] + 0.5) * bin_h[:, None, None] / gh_f[:, None, None])
    x = (x1[:, None, None] + bj[None, :, None] * bin_w[:, None, None]
         + (ix[None, None, :] + 0.5) * bin_w[:, None, None] / gw_f[:, None, None])
    y = y[:, :, None, None, :]
    x = x[:, None, :, None, :]
    if offsets is not None:
        off = tf.reshape(offsets, [num_rois, ph, pw, groups, 2])
        y = y + (gamma * off[..., 1] * roi_h[:, None, None, None])[..., None]
        x = x + (gamma * off[..., 0] * roi_w[:, None, None, None])[..., None]
    y_in_grid = tf.range(max_h)[None, :] < grid_h[:, None]  # [R, Sy]
    x_in_grid = tf.range(max_w)[None, :] < grid_w[:, None]

    y0, y1i, wy0, wy1, y_inside = _roi_align_axis(y, height)
    x0, x1i, wx0, wx1, x_inside = _roi_align_axis(x, width)
    y_ok = tf.cast(y_inside & y_in_grid[:, None, None, None, :], tf.float32)
    x_ok = tf.cast(x_inside & x_in_grid[:, None, None, None, :], tf.float32)

    # Row index of (b, plane, group, y, x) in `rows`; broadcast to [R, ph, pw, G, Sy, Sx].
    b = box_indices[:, None, None, None, None, None]
    if position_sensitive:
        plane = (tf.range(ph)[:, None] * pw + tf.range(pw)[None, :])[None, :, :, None, None, None]
    else:
        plane = tf.zeros([1, 1, 1, 1, 1, 1], tf.int32)
    group = tf.range(groups)[None, None, None, :, None, None]
    base = ((b * planes + plane) * groups + group) * height

    def corner(yy, xx, weight):
        index = (base + yy[..., :, None]) * width + xx[..., None, :]
        values = tf.gather(rows, index)  # [R, ph, pw, G, Sy, Sx, cpg]
        return tf.einsum("rijgyx,rijgyxc->rijgc", weight, values)

    wy0, wy1 = wy0 * y_ok, wy1 * y_ok
    wx0, wx1 = wx0 * x_ok, wx1 * x_ok
    total = (corner(y0, x0, wy0[..., :, None] * wx0[..., None, :])
             + corner(y0, x1i, wy0[..., :, None] * wx1[..., None, :])
             + corner(y1i, x0, wy1[..., :, None] * wx0[..., None, :])
             + corner(y1i, x1i, wy1[..., :, None] * wx1[..., None, :]))
    out = total * inv_count[:, None, None, None, None]
    return tf.reshape(out, [num_rois, ph, pw, groups * cpg])


def _divide(numerator, count):
    """float32 numerator / Python int `count`, rounded exactly as the kernels' C++ division.

    Inside a graph, TensorFlow's optimizer turns a division by a constant into a multiplication by
    its reciprocal, which can be one ulp off (14 * (1 / 7) = 2.0000002); the ceil / floor of bin
    edges and adaptive sample counts then jump by a whole pixel or sample. Dividing in float64 and
    rounding to float32 gives the correctly rounded quotient either way.
    """
    return tf.cast(tf.cast(numerator, tf.float64) / float(count), tf.float32)


def _round_half_away(v):
    # Same rounding as the kernels (C's round): tf.round would round half to even.
    return tf.sign(v) * tf.floor(tf.abs(v) + 0.5)


def _c_round(v):
    """C's roundf, exactly: half away from zero. Unlike floor(|v| + 0.5) this stays right where
    |v| + 0.5 rounds up in float32 (v = 0.49999997 gives 0, as roundf does)."""
    whole = tf.sign(v) * tf.floor(tf.abs(v))
    # The fractional part v - whole is exact in float32, so the tie test is exact.
    return whole + tf.sign(v) * tf.cast(tf.abs(v - whole) >= 0.5, v.dtype)


def _fast_rcnn_bins(lo, hi, parts, size, spatial_scale):
    """roi_pool's float bin edges [R, parts] (see the module docstring), not yet clipped."""
    start = _round_half_away(lo * spatial_scale)
    end = _round_half_away(hi * spatial_scale)
    bin_size = _divide(tf.maximum(end - start + 1.0, 1.0), parts)
    k = tf.cast(tf.range(parts), tf.float32)
    first = tf.floor(k[None, :] * bin_size[:, None]) + start[:, None]
    last = tf.math.ceil((k[None, :] + 1.0) * bin_size[:, None]) + start[:, None]
    return first, last, tf.cast(size, tf.float32)


def _rfcn_bins(lo, hi, parts, size, spatial_scale):
    """R-FCN's float bin edges (Caffe's PSROIPooling): corners rounded in image pixels, then
    scaled, inclusive end, RoI at least 0.1 feature pixels."""
    start = _c_round(lo) * spatial_scale
    end = (_c_round(hi) + 1.0) * spatial_scale
    bin_size = _divide(tf.maximum(end - start, 0.1), parts)
    k = tf.cast(tf.range(parts), tf.float32)
    first = tf.floor(k[None, :] * bin_size[:, None] + start[:, None])
    last = tf.math.ceil((k[None, :] + 1.0) * bin_size[:, None] + start[:, None])
    return first, last, tf.cast(size, tf.float32)


def _torchvision_bins(lo, hi, parts, size, spatial_scale):
    """torchvision.ops.ps_roi_pool's float bin edges: no inclusive end, RoI at least 1 pixel, and
    clipped one pixel short of the map's end like torchvision's forward pass."""
    start = _c_round(lo * spatial_scale)
    end = _c_round(hi * spatial_scale)
    bin_size = _divide(tf.maximum(end - start, 1.0), parts)
    k = tf.cast(tf.range(parts), tf.float32)
    first = tf.floor(k[None, :] * bin_size[:, None]) + start[:, None]
    last = tf.math.ceil((k[None, :] + 1.0) * bin_size[:, None]) + start[:, None]
    return first, last, tf.cast(tf.maximum(size - 1, 0), tf.float32)


_BIN_RULES = {"fast_rcnn": _fast_rcnn_bins, "rfcn": _rfcn_bins, "torchvision": _torchvision_bins}


def _integer_bin_pool_tf(op, features, boxes, box_indices, ph, pw, spatial_scale,
                         position_sensitive, rule="fast_rcnn"):
    """RoIPool (max) / PSRoIPool (average) over integer pixel bins with builtin ops only; `rule`
    names the bin rule: "fast_rcnn" (roi_pool), "rfcn" or "torchvision" (ps_roi_pool)."""
    box_indices, boxes = _checked_fallback_inputs(op, features, boxes, box_indices, ph, pw,
                                                  position_sensitive)
    shape = tf.shape(features)
    height, width = shape[1], shape[2]
    rows, planes = _planes(features, 1, ph, pw, position_sensitive)
    num_rois = tf.shape(boxes)[0]

    def bins(lo, hi, parts, size):
        first, last, limit = _BIN_RULES[rule](lo, hi, parts, size, spatial_scale)
        # Clip in float before the cast so that huge coordinates cannot overflow int32.
        first = tf.cast(tf.clip_by_value(first, 0.0, limit), tf.int32)
        last = tf.cast(tf.clip_by_value(last, 0.0, limit), tf.int32)
        return first, last  # [R, parts]

    h0, h1 = bins(boxes[:, 1], boxes[:, 3], ph, height)
    w0, w1 = bins(boxes[:, 0], boxes[:, 2], pw, width)
    if position_sensitive:
        return _box_average_tf(rows, planes, height, width, box_indices, h0, h1, w0, w1, ph, pw)
    if in_xla_context():
        raise unsupported(f"{op}'s pure-TensorFlow max pooling (its window is as large as the "
                          "largest bin, which depends on the boxes)", "RoIAlign compiles.")
    # Max pooling: one window as large as the largest bin; pixels past a bin's end are masked out.
    # (Memory grows with R * ph * pw * largest bin area * C: fine for tests and serving batches,
    # heavy for hundreds of very large RoIs, where the compiled kernel is the tool.)
    max_h = tf.reduce_max(tf.concat([tf.reshape(h1 - h0, [-1]), [0]], 0))
    max_w = tf.reduce_max(tf.concat([tf.reshape(w1 - w0, [-1]), [0]], 0))
    yy = h0[:, :, None] + tf.range(max_h)[None, None, :]  # [R, ph, Ky]
    xx = w0[:, :, None] + tf.range(max_w)[None, None, :]  # [R, pw, Kx]
    y_ok = yy < h1[:, :, None]
    x_ok = xx < w1[:, :, None]
    yy = tf.minimum(yy, tf.maximum(height - 1, 0))
    xx = tf.minimum(xx, tf.maximum(width - 1, 0))

    b = box_indices[:, None, None, None, None]
    if position_sensitive:
        plane = (tf.range(ph)[:, None] * pw + tf.range(pw)[None, :])[None, :, :, None, None]
    else:
        plane = tf.zeros([1, 1, 1, 1, 1], tf.int32)
    index = (((b * planes + plane) * height + yy[:, :, None, :, None]) * width
             + xx[:, None, :, None, :])  # [R, ph, pw, Ky, Kx]
    valid = y_ok[:, :, None, :, None] & x_ok[:, None, :, None, :]
    values = tf.gather(rows, index)  # [R, ph, pw, Ky, Kx, C]
    best = tf.reduce_max(tf.where(valid[..., None], values, float("-inf")), axis=[3, 4])
    empty = tf.logical_not(tf.reduce_any(valid, axis=[3, 4]))[..., None]
    out = tf.where(empty, 0.0, best)
    return tf.reshape(out, [num_rois, ph, pw, tf.shape(rows)[-1]])


def _box_average_tf(rows, planes, height, width, box_indices, h0, h1, w0, w1, ph, pw):
    """Average over the integer bins [h0, h1) x [w0, w1) of every bin's plane, from a summed-area
    table: four gathers per bin whatever its size (memory independent of the RoI sizes). The
    table is accumulated in float64 so that differences of large prefix sums stay exact to well
    below float32 resolution."""
    c_out = tf.shape(rows)[-1]
    x = tf.cast(tf.reshape(rows, [-1, height, width, c_out]), tf.float64)  # [B * P, H, W, C']
    table = tf.cumsum(tf.cumsum(x, axis=1), axis=2)
    table = tf.pad(table, [[0, 0], [1, 0], [1, 0], [0, 0]])  # S[y, x] = sum of [0, y) x [0, x)
    table = tf.reshape(table, [-1, c_out])
    b = box_indices[:, None, None]
    if planes > 1:
        plane = (tf.range(ph)[:, None] * pw + tf.range(pw)[None, :])[None]
    else:
        plane = tf.zeros([1, 1, 1], tf.int32)
    base = (b * planes + plane) * (height + 1)  # [R, ph, pw]

    def corner(yy, xx):  # yy [R, ph], xx [R, pw]
        return tf.gather(table, (base + yy[:, :, None]) * (width + 1) + xx[:, None, :])

    total = corner(h1, w1) - corner(h0, w1) - corner(h1, w0) + corner(h0, w0)
    count = tf.cast(tf.maximum(h1 - h0, 0)[:, :, None] * tf.maximum(w1 - w0, 0)[:, None, :],
                    tf.float64)
    return tf.cast(tf.math.divide_no_nan(total, count[..., None]), tf.float32)


# ----------------------------------------------------------------------------------------------
# Gradients of the compiled ops (their own gradient kernels)
# ----------------------------------------------------------------------------------------------

def _attrs(op, names):
    return {n: op.get_attr(n) for n in names}


def _register_gradients():
    align_attrs = ("pooled_height", "pooled_width", "spatial_scale", "sampling_ratio")

    def roi_pool_grad(op, grad, _argmax_grad):
        gf = _kernel("kerasdet_roi_pool_grad")(
            grad=grad, argmax=op.outputs[1], box_indices=op.inputs[2],
            features_shape=tf.shape(op.inputs[0]),
            **_attrs(op, ("pooled_height", "pooled_width", "spatial_scale")))
        return [gf, None, None]

    def ps_roi_pool_grad(op, grad):
        gf = _kernel("kerasdet_ps_roi_pool_grad")(
            grad=grad, boxes=op.inputs[1], box_indices=op.inputs[2],
            features_shape=tf.shape(op.inputs[0]),
            **_attrs(op, ("pooled_height", "pooled_width", "spatial_scale")),
            bin_rule=op.get_attr("bin_rule").decode())
        return [gf, None, None]

    def roi_align_grad(op, grad):
        gf = _kernel("kerasdet_roi_align_grad")(
            grad=grad, boxes=op.inputs[1], box_indices=op.inputs[2],
            features_shape=tf.shape(op.inputs[0]), **_attrs(op, align_attrs + ("aligned",)))
        return [gf, None, None]

    def ps_roi_align_grad(op, grad):
        gf = _kernel("kerasdet_ps_roi_align_grad")(
            grad=grad, boxes=op.inputs[1], box_indices=op.inputs[2],
            features_shape=tf.shape(op.inputs[0]), **_attrs(op, align_attrs))
        return [gf, None, None]

    def deform_roi_pool_grad(op, grad):
        gf, go = _kernel("kerasdet_deform_roi_pool_grad")(
            grad=grad, features=op.inputs[0], boxes=op.inputs[1], box_indices=op.inputs[2],
            offsets=op.inputs[3], **_attrs(op, align_attrs + ("aligned", "gamma")))
        return [gf, None, None, go]

    def deform_ps_roi_pool_grad(op, grad):
        gf, go = _kernel("kerasdet_deform_ps_roi_pool_grad")(
            grad=grad, features=op.inputs[0], boxes=op.inputs[1], box_indices=op.inputs[2],
            offsets=op.inputs[3], **_attrs(op, align_attrs + ("gamma",)))
        return [gf, None, None, go]

    _kernels.register_gradients({
        "KerasDet>RoIPool": roi_pool_grad, "KerasDet>PSRoIPool": ps_roi_pool_grad,
        "KerasDet>RoIAlign": roi_align_grad, "KerasDet>PSRoIAlign": ps_roi_align_grad,
        "KerasDet>DeformRoIPool": deform_roi_pool_grad,
        "KerasDet>DeformPSRoIPool": deform_ps_roi_pool_grad})


_register_gradients()
