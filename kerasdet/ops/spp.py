"""Spatial pyramid pooling (SPP-net, He et al. 2014): dense, per-RoI, and the detection helpers.

Bins. For an a x a map and an n x n level the paper pools with window ceil(a / n) and stride
floor(a / n) (seed 004: "win = ceil(a/n) -> window size, str = floor(a/n) -> stride"). Here bin i of
a level along an axis of length a spans [start_i, start_i + win) with
  * a >= n: win = ceil(a / n), start_i = i * floor(a / n)   (the paper's rule; every bin lies inside
    the map, since (n - 1) * floor(a / n) + ceil(a / n) <= a);
  * a <  n: win = 1, start_i = floor(i * a / n). The paper's rule gives stride 0 there, i.e. n
    copies of the first pixel and the rest of the map unused; spreading the pixels instead is
    nearest-neighbour upsampling of the map to n bins, so every pixel is read.
Height and width are binned independently (non-square maps). Note that the paper's rule does not
always cover the map: a = 10, n = 4 gives bins [0,3) [2,5) [4,7) [6,9) (row 9 is never read) where
Fast R-CNN's RoIPool gives [0,3) [2,5) [5,8) [7,10); a = 10, n = 6 reads rows 0..6 only.

Output order. Levels in the order of `levels` (default (6, 3, 2, 1): 36 + 9 + 4 + 1 = 50 bins);
within a level channel-major, then bin row, then bin column, i.e. Caffe's flattening of the
level's [C, n, n] blob. The seed does not state an order; this one is the reference
implementation's (Caffe, NCHW), so an fc6 trained there maps without a permutation. Output length
C * sum(n^2), whatever the map size.

Detection helpers (SPP-net sec. 4 and appendix; the seed summarises only the bin rule, these
follow the paper's text):
  * choose_scale: "we choose a single scale s in S such that the scaled candidate window has a
    number of pixels closest to 224 x 224" -> closeness on the area |w h (s / m)^2 - 224^2|
    (m = the image's shorter side), not on sqrt(area).
  * project_to_features: appendix "Mapping a window to feature maps": with floor(p / 2) padding at
    every layer, the response at x' has its receptive field centred at x = S x'; the left (top)
    boundary goes to x' = floor(x / S) + 1 and the right (bottom) one to x' = ceil(x / S) - 1.

RoI SPP speed (2 CPU cores shared with other jobs, float32, tf.function graph): 2000 random RoIs
(up to 40 x 30 cells) on a 1 x 60 x 80 x 256 map, levels (6, 3, 2, 1), output 2000 x 12800:
forward 0.1 s per call with the sparse-table forward (`_roi_values_table`: range maxima over
power-of-two rectangles, four gathers per bin for all RoIs at once; 0.7 s to 1.4 s with the earlier
tf.map_fn over the RoIs, which remains the fallback above TABLE_ELEMENT_BUDGET); forward + gradient
6 s to 6.5 s (the arg-max backward is still a loop over the RoIs).
"""
import tensorflow as tf

__all__ = ["SPP_LEVELS", "SPP_SCALES", "spp_bins", "spp_bin_ranges", "spp_output_dim",
           "spatial_pyramid_pool", "roi_spatial_pyramid_pool", "choose_scale",
           "project_to_features"]

SPP_LEVELS = (6, 3, 2, 1)
SPP_SCALES = (480, 576, 688, 864, 1200)


def _levels(op, levels):
    try:
        levels = tuple(int(n) for n in levels)
    except TypeError:
        raise TypeError(f"{op}: `levels` must be a sequence of ints, got {levels!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"{op}: `levels` must be non-empty positive ints, got {levels!r}")
    return levels


def spp_bins(a, n):
    """(window, stride) of an n-bin level on an axis of length `a` (python ints).

    The paper's ceil(a / n), floor(a / n) for a >= n. For a < n: (1, 0), with the bins placed at
    floor(i * a / n) (see the module docstring and `spp_bin_ranges`).
    """
    a, n = int(a), int(n)
    if a < 1:
        raise ValueError(f"spp_bins: `a` must be >= 1, got {a}")
    if n < 1:
        raise ValueError(f"spp_bins: `n` must be >= 1, got {n}")
    if a < n:
        return 1, 0
    return -(-a // n), a // n


def spp_bin_ranges(a, n):
    """[(start, end)] of the n bins on an axis of length `a` (end exclusive)."""
    window, stride = spp_bins(a, n)
    if a < n:
        return [(i * a // n, i * a // n + 1) for i in range(n)]
    return [(i * stride, i * stride + window) for i in range(n)]


def spp_output_dim(channels, levels=SPP_LEVELS):
    """Length of the pooled vector: channels * sum(n^2)."""
    return int(channels) * sum(n * n for n in _levels("spp_output_dim", levels))


def _tensor_bins(a, n):
    """Tensor twin of spp_bin_ranges: (starts [..., n], window [...]) for int32 `a` of any shape."""
    a = tf.convert_to_tensor(a, tf.int32)
    i = tf.range(n, dtype=tf.int32)
    big = a >= n
    window = tf.where(big, (a + n - 1) // n, 1)
    starts = tf.where(big[..., None], i * (a // n)[..., None], (i * a[..., None]) // n)
    return starts, window


def _pool_level(features, n):
    """[B, H, W, C] -> [B, C * n * n] (channel-major) for one level; H, W may be dynamic."""
    shape = tf.shape(features)
    for axis in (1, 2):
        # Max over a rectangle is separable: rows first, then columns. Each bin gathers its
        # window's rows ([n, window] indices), so overlapping bins just read a row twice.
        starts, window = _tensor_bins(shape[axis], n)
        index = starts[:, None] + tf.range(window)[None, :]
        features = tf.reduce_max(tf.gather(features, index, axis=axis), axis=axis + 1)
    channels = features.shape[-1] if features.shape[-1] is not None else shape[3]
    return tf.reshape(tf.transpose(features, [0, 3, 1, 2]), [shape[0], channels * n * n])


def _level_argmax(window, n):
    """(rows, cols) [n, n, C] of each bin's maximum in a [h, w, C] window (first one on ties)."""
    shape = tf.shape(window)
    starts, size = _tensor_bins(shape[0], n)
    index = starts[:, None] + tf.range(size)[None, :]  # [n, size]
    rows = tf.gather(window, index, axis=0)  # [n, size, w, C]
    row = tf.argmax(rows, axis=1, output_type=tf.int32) + starts[:, None, None]  # [n, w, C]
    values = tf.reduce_max(rows, axis=1)
    starts, size = _tensor_bins(shape[1], n)
    index = starts[:, None] + tf.range(size)[None, :]
    cols = tf.gather(values, index, axis=1)  # [n, n, size, C]
    col = tf.argmax(cols, axis=2, output_type=tf.int32) + starts[None, :, None]  # [n, n, C]
    # the row of the winner: row[i, col[i, j, c], c]
    row = tf.experimental.numpy.take_along_axis(row, col, axis=1)
    return row, col


def spatial_pyramid_pool(features, levels=SPP_LEVELS):
    """Spatial pyramid max pooling of [B, H, W, C] maps (any, also dynamic, H and W >= 1).

    Returns [B, C * sum(n^2)] in the features' dtype, ordered as the module docstring says.
    Differentiable (the gradient of a bin goes to its maximum; overlapping bins add up).
    """
    levels = _levels("spatial_pyramid_pool", levels)
    features = tf.convert_to_tensor(features)
    if not features.dtype.is_floating:
        raise TypeError(f"spatial_pyramid_pool: `features` must be floating, "
                        f"got {features.dtype.name}")
    if features.shape.rank is not None and features.shape.rank != 4:
        raise ValueError(f"spatial_pyramid_pool: `features` must be [B, H, W, C], "
                         f"got shape {features.shape}")
    for axis, name in ((1, "height"), (2, "width")):
        if features.shape[axis] == 0:
            raise ValueError(f"spatial_pyramid_pool: the feature {name} must be >= 1, "
                             f"got shape {features.shape}")
    return tf.concat([_pool_level(features, n) for n in levels], axis=-1)


def roi_spatial_pyramid_pool(features, rois, box_indices=None, levels=SPP_LEVELS):
    """SPP of each RoI's window of a [B, H, W, C] map.

    Args:
      features: [B, H, W, C] floating.
      rois: integer (x1, y1, x2, y2) feature-map cells, inclusive corners (as `project_to_features`
        returns): [R, 4] with `box_indices` [R], or padded per image [B, N, 4] without.
        Corners are clamped to the map and x2 >= x1, y2 >= y1 enforced, so padding rows pool a
        1 x 1 window harmlessly.
      levels: pyramid levels.

    Returns [R, D] or [B, N, D], D = C * sum(n^2): each window binned by the paper's rule applied
    to the window's own height and width (not to the map's), in the features' dtype. The gradient
    of each value goes to its bin's arg-max pixel.
    """
    op = "roi_spatial_pyramid_pool"
    levels = _levels(op, levels)
    features = tf.convert_to_tensor(features)
    if not features.dtype.is_floating:
        raise TypeError(f"{op}: `features` must be floating, got {features.dtype.name}")
    if features.shape.rank is not None and features.shape.rank != 4:
        raise ValueError(f"{op}: `features` must be [B, H, W, C], got shape {features.shape}")
    rois = tf.convert_to_tensor(rois)
    if rois.dtype.is_floating:
        # Projected corners are integers already; rounding guards against 2.9999 from float math.
        rois = tf.round(rois)
    rois = tf.cast(rois, tf.int32)
    batched = box_indices is None
    if batched:
        if rois.shape.rank != 3:
            raise ValueError(f"{op}: without `box_indices`, `rois` must be [B, N, 4], "
                             f"got shape {rois.shape}")
        rshape = tf.shape(rois)
        box_indices = tf.repeat(tf.range(rshape[0], dtype=tf.int32), rshape[1])
        flat = tf.reshape(rois, [-1, 4])
    else:
        if rois.shape.rank != 2:
            raise ValueError(f"{op}: with `box_indices`, `rois` must be [R, 4], "
                             f"got shape {rois.shape}")
        flat = rois
        box_indices = tf.cast(box_indices, tf.int32)
    if flat.shape[-1] is not None and flat.shape[-1] != 4:
        raise ValueError(f"{op}: `rois` needs 4 values in its last axis, got shape {rois.shape}")
    fshape = tf.shape(features)
    x1 = tf.clip_by_value(flat[:, 0], 0, fshape[2] - 1)
    y1 = tf.clip_by_value(flat[:, 1], 0, fshape[1] - 1)
    x2 = tf.clip_by_value(flat[:, 2], x1, fshape[2] - 1)
    y2 = tf.clip_by_value(flat[:, 3], y1, fshape[1] - 1)
    channels = features.shape[-1]
    if channels is None:
        raise ValueError(f"{op}: the channel axis of `features` must be known, "
                         f"got shape {features.shape}")
    dim = channels * sum(n * n for n in levels)

    pooled = _roi_pool(features, box_indices, x1, y1, x2, y2, levels=levels, dim=dim)
    if batched:
        return tf.reshape(pooled, [rshape[0], rshape[1], dim])
    return pooled


# Above this many table elements (levels_h x levels_w x B x H x W x C) the RoI forward falls back
# to the per-RoI loop: ZF-5 conv5 of a 1200 x 1600 image (75 x 100 x 256, 7 x 7 table levels) has
# 94 M, 377 MB in float32.
TABLE_ELEMENT_BUDGET = 128 * 1024 * 1024


def _floor_log2(v):
    """floor(log2(v)) of int32 v >= 1, exact (the float estimate corrected by one either way)."""
    k = tf.cast(tf.floor(tf.math.log(tf.cast(v, tf.float32)) / 0.6931471805599453), tf.int32)
    k = tf.where(tf.bitwise.left_shift(1, k + 1) <= v, k + 1, k)
    return tf.where(tf.bitwise.left_shift(1, k) > v, k - 1, k)


def _range_tables(x, axis):
    """[K, *x.shape], K = floor(log2(size)) + 1: level k at position i holds the max of x over
    [i, i + 2^k) along `axis` (valid where i + 2^k <= size; the rest wraps around and is never
    read). Any range's max is then the max of two overlapping power-of-two ranges."""
    size = tf.shape(x)[axis]
    count = _floor_log2(size) + 1
    table = tf.TensorArray(x.dtype, size=count, element_shape=x.shape).write(0, x)

    def body(k, previous, table):
        step = tf.bitwise.left_shift(1, k - 1)
        current = tf.maximum(previous, tf.roll(previous, -step, axis=axis))
        return k + 1, current, table.write(k, current)

    _, _, table = tf.while_loop(lambda k, *_: k < count, body, (tf.constant(1), x, table))
    return table.stack()


def _roi_values_table(features, windows, levels, dim):
    """Vectorized RoI SPP forward: a 2-D sparse table of the map (range maxima over power-of-two
    rectangles) makes every bin's max four gathers, for all RoIs and bins at once, instead of a
    loop over the RoIs (about 20x faster on 2000 RoIs)."""
    b, x1, y1, x2, y2 = windows
    shape = tf.shape(features)
    channels = features.shape[-1]
    tables = _range_tables(_range_tables(features, axis=1), axis=3)  # [Kw, Kh, B, H, W, C]
    kh_count = tf.shape(tables)[1]
    flat = tf.reshape(tables, [-1, channels])

    def ranges(lo, hi, n):
        starts, window = _tensor_bins(hi - lo + 1, n)
        k = _floor_log2(window)
        first = lo[:, None] + starts  # [R, n]
        return first, first + (window - tf.bitwise.left_shift(1, k))[:, None], k

    parts = []
    for n in levels:
        ya, yb, kh = ranges(y1, y2, n)
        xa, xb, kw = ranges(x1, x2, n)
        base = (kw * kh_count + kh) * shape[0] + b  # [R]
        values = None
        for ys in (ya, yb):
            for xs in (xa, xb):
                index = ((base[:, None, None] * shape[1] + ys[:, :, None]) * shape[2]
                         + xs[:, None, :])  # [R, n, n]
                got = tf.gather(flat, index)
                values = got if values is None else tf.maximum(values, got)
        parts.append(tf.reshape(tf.transpose(values, [0, 3, 1, 2]), [-1, channels * n * n]))
    return tf.concat(parts, axis=-1)


def _roi_values(features, windows, levels, dim):
    shape = tf.shape(features)
    sides = tf.cast(shape[1:3], tf.float32)
    table_size = ((tf.floor(tf.math.log(sides[0]) / 0.6931471805599453) + 1.0)
                  * (tf.floor(tf.math.log(sides[1]) / 0.6931471805599453) + 1.0)
                  * tf.cast(tf.reduce_prod(shape), tf.float32))
    return tf.cond(table_size <= TABLE_ELEMENT_BUDGET,
                   lambda: _roi_values_table(features, windows, levels, dim),
                   lambda: _roi_values_loop(features, windows, levels, dim))


def _roi_values_loop(features, windows, levels, dim):
    def one(args):
        b, x1, y1, x2, y2 = args
        return spatial_pyramid_pool(features[b, y1:y2 + 1, x1:x2 + 1][None], levels)[0]

    # A loop over RoIs: each window has its own bin sizes, and a vectorized gather over the
    # largest window would need R * n * window * W * C memory (gigabytes for 2000 RoIs).
    return tf.map_fn(one, windows, fn_output_signature=tf.TensorSpec([dim], features.dtype),
                     parallel_iterations=32)


def _roi_argmax(features, windows, levels, dim):
    """Flat index into `features` of every output value's arg-max pixel, [R, dim] int32."""
    shape = tf.shape(features)
    channels = features.shape[-1]
    channel = tf.range(channels, dtype=tf.int32)

    def one(args):
        b, x1, y1, x2, y2 = args
        window = features[b, y1:y2 + 1, x1:x2 + 1]
        parts = []
        for n in levels:
            rows, cols = _level_argmax(window, n)
            flat = ((b * shape[1] + y1 + rows) * shape[2] + x1 + cols) * channels + channel
            parts.append(tf.reshape(tf.transpose(flat, [2, 0, 1]), [-1]))
        return tf.concat(parts, axis=0)

    return tf.map_fn(one, windows, fn_output_signature=tf.TensorSpec([dim], tf.int32),
                     parallel_iterations=32)


def _roi_pool(features, box_indices, x1, y1, x2, y2, levels, dim):
    """Forward: the max of each bin. Backward: the gradient of a bin goes to its arg-max pixel
    (first one on ties), as in Caffe's max pooling and Fast R-CNN's RoIPool. Autodiff through the
    forward loop keeps every RoI's intermediate tensors and was slower (2000 RoIs on 60 x 80 x 256:
    7 s to 10 s forward + backward, against 6 s); the arg-max indices are only computed when a
    gradient is asked for (SPP-net's detector fine-tunes fc layers only)."""
    windows = (box_indices, x1, y1, x2, y2)

    @tf.custom_gradient
    def pool(features):
        values = _roi_values(features, windows, levels, dim)

        def grad(upstream):
            index = _roi_argmax(features, windows, levels, dim)
            flat = tf.math.unsorted_segment_sum(tf.reshape(upstream, [-1]),
                                                tf.reshape(index, [-1]), tf.size(features))
            return tf.reshape(flat, tf.shape(features))

        return values, grad

    return pool(features)


def choose_scale(boxes, scales=SPP_SCALES, target=224.0, *, image_size):
    """Index into `scales` of the scale each window is pooled at (SPP-net sec. 4.2).

    The image is resized so that its shorter side is s; the chosen s makes the window's area
    w h (s / min(H, W))^2 closest to target^2 (ties: the smaller index).

    Args:
      boxes: [..., 4] (x1, y1, x2, y2) in original image pixels (w = x2 - x1, h = y2 - y1).
      scales: shorter-side sizes.
      target: side of the target area.
      image_size: (H, W) of the original image, [2] or [..., 2] matching boxes' leading axes
        without the box axis (e.g. [B, 2] for [B, N, 4] boxes).
    Returns int32 [...].
    """
    scales = tf.constant([float(s) for s in scales], tf.float32)
    if scales.shape[0] == 0:
        raise ValueError("choose_scale: `scales` must not be empty")
    if not float(target) > 0:
        raise ValueError(f"choose_scale: `target` must be > 0, got {target!r}")
    boxes = tf.cast(boxes, tf.float32)
    image_size = tf.cast(image_size, tf.float32)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    shorter = tf.reduce_min(image_size, axis=-1)[..., None, None]
    scaled = area[..., None] * tf.square(scales / shorter)
    return tf.argmin(tf.abs(scaled - float(target) ** 2), axis=-1, output_type=tf.int32)


def project_to_features(boxes, stride=16, offset=0.0, feature_size=None):
    """SPP-net appendix: image-domain windows -> inclusive feature-map cells (x1', y1', x2', y2').

    Convention (0-based). The corners are points in the coordinates of the (resized) network
    input, and feature pixel x' (0-based) has its receptive field centred at S x' + offset in the
    same coordinates. The paper states the centre as x = S x' for a network padded by floor(p / 2)
    at every layer, which is the 0-based relation (its first response is centred on its first
    pixel; with 1-based indices it would be S (x' - 1) + 1), so offset = 0 is the paper's network
    and the paper's formulas apply as written to x - offset:
        left / top:     x' = floor((x - offset) / S) + 1
        right / bottom: x' = ceil((x - offset) / S) - 1
    (the paper: "If the padding is not floor(p/2), we need to add a proper offset to x"). Both
    pick the first / last cell whose centre lies strictly inside the window, so a corner exactly on
    a centre moves one cell inward: the rule is the paper's, not a nearest-centre rounding.
    The offset depends on the box convention. In pixel indices (a pixel's centre is its index, the
    paper's reading) the paper's network has offset 0 and kerasdet's ZF5 (conv1 pads 1, conv2
    none, ceil-mode pools) has 20: its conv5 pixel m is centred on input pixel 16 m + 20. With
    kerasdet's continuous boxes (pixel i spans [i, i + 1)) add 0.5 to those offsets.

    The result is clamped to [0, size - 1] when `feature_size` (H', W') is given (else only to
    >= 0), and a window that the rule empties (x2' < x1', a window narrower than about 2 S) becomes
    the single cell whose centre is closest to the window's centre (ties to the even cell).

    Args:
      boxes: [..., 4] (x1, y1, x2, y2).
      stride: S, the product of all strides before the feature map.
      offset: image coordinate of the receptive-field centre of feature pixel 0.
      feature_size: optional (H', W') for clamping (ints or scalar tensors).
    Returns int32 [..., 4].
    """
    if not float(stride) > 0:
        raise ValueError(f"project_to_features: `stride` must be > 0, got {stride!r}")
    boxes = tf.cast(boxes, tf.float32)
    if boxes.shape.rank is not None and boxes.shape[-1] not in (None, 4):
        raise ValueError(f"project_to_features: `boxes` needs 4 values in its last axis, "
                         f"got shape {boxes.shape}")
    s = float(stride)
    b = (boxes - float(offset)) / s
    x1, y1, x2, y2 = tf.unstack(b, axis=-1)
    left, top = tf.floor(x1) + 1.0, tf.floor(y1) + 1.0
    right, bottom = tf.math.ceil(x2) - 1.0, tf.math.ceil(y2) - 1.0
    if feature_size is not None:
        high_y = tf.cast(feature_size[0], tf.float32) - 1.0
        high_x = tf.cast(feature_size[1], tf.float32) - 1.0
    else:
        high_y = high_x = tf.constant(float("inf"))

    def fit(lo, hi, centre, high):
        lo = tf.clip_by_value(lo, 0.0, high)
        hi = tf.clip_by_value(hi, 0.0, high)
        nearest = tf.clip_by_value(tf.round(centre), 0.0, high)
        empty = hi < lo
        return tf.where(empty, nearest, lo), tf.where(empty, nearest, hi)

    left, right = fit(left, right, (x1 + x2) / 2.0, high_x)
    top, bottom = fit(top, bottom, (y1 + y2) / 2.0, high_y)
    return tf.cast(tf.stack([left, top, right, bottom], axis=-1), tf.int32)
