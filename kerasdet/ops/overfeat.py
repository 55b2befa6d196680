"""OverFeat's dense evaluation and box merging (Sermanet et al., ICLR 2014, sections 3.3 and 4.3).

- `offset_max_pool` / `interleave_offsets`: the fine stride of figure 3. The unpooled top map is
  max-pooled p x p (non-overlapping) at the p^2 offsets (dy, dx) in {0..p-1}^2; a classifier slides
  over every pooled copy; the copies' outputs are interleaved into one map whose stride is p times
  finer. Fine output (u, v) looks at unpooled cells [u, u + p*k) x [v, v + p*k) for a classifier of
  k x k pooled cells, so in the input it is the window at (v * s, u * s) of the network's training
  input size (s = stride of the unpooled map): `window_boxes`.
- `match_score` / `greedy_merge`: the greedy merge of section 4.3 (`greedy_merge_numpy` is the
  plain-Python reading of the algorithm the tests compare against).
"""
import numpy as np
import tensorflow as tf


def pooled_size(size, pool):
    """Size of every offset copy: the smallest over the offsets, floor((n - d) / p) at d = p - 1,
    so the p copies of an axis have one size and interleave into p times as many cells."""
    return (size - (pool - 1)) // pool


def offset_max_pool(features, pool=3, offsets=None):
    """[B, H, W, C] -> [P, B, h, w, C]: max pooling p x p / p of `features` shifted by each offset.

    Args:
        features: the unpooled top conv map.
        pool: p, the pooling size and stride of the network's last pooling layer.
        offsets: list of (dy, dx); default all p^2 of {0..p-1}^2, row-major (dy, then dx). [(0, 0)]
            is the coarse stride (the network's own pooling, cropped to the common size).
    Returns the copies stacked on a new leading axis, h = pooled_size(H, p), w = pooled_size(W, p).
    """
    if offsets is None:
        offsets = [(dy, dx) for dy in range(pool) for dx in range(pool)]
    shape = tf.shape(features)
    h, w = pooled_size(shape[1], pool), pooled_size(shape[2], pool)
    copies = []
    for dy, dx in offsets:
        window = features[:, dy:dy + h * pool, dx:dx + w * pool, :]
        copies.append(tf.nn.max_pool2d(window, pool, pool, "VALID"))
    return tf.stack(copies, axis=0)


def interleave_offsets(maps, pool=3):
    """[p*p, B, h, w, K] (offsets row-major, as `offset_max_pool`) -> [B, p*h, p*w, K] with
    out[b, p*i + dy, p*j + dx] = maps[p*dy + dx, b, i, j] (figure 3 (e))."""
    shape = tf.shape(maps)
    b, h, w, k = shape[1], shape[2], shape[3], shape[4]
    x = tf.reshape(maps, tf.stack([pool, pool, b, h, w, k]))
    x = tf.transpose(x, [2, 3, 0, 4, 1, 5])  # [B, h, dy, w, dx, K]
    return tf.reshape(x, tf.stack([b, h * pool, w * pool, k]))


def window_boxes(height, width, stride, window):
    """[height, width, 4] float32 boxes (x1, y1, x2, y2) of the input windows behind a dense output
    map whose cell (u, v) starts at input pixel (v * stride, u * stride) and is `window` wide."""
    ys = tf.cast(tf.range(height), tf.float32) * float(stride)
    xs = tf.cast(tf.range(width), tf.float32) * float(stride)
    y, x = tf.meshgrid(ys, xs, indexing="ij")
    return tf.stack([x, y, x + float(window), y + float(window)], axis=-1)


def coverage(windows, boxes):
    """[N, M] fraction of each box (M) inside each window (N): intersection / box area. The paper
    does not train the regressor on boxes with less than 50 % of themselves in the window."""
    windows = tf.cast(windows, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    lt = tf.maximum(windows[:, None, :2], boxes[None, :, :2])
    rb = tf.minimum(windows[:, None, 2:], boxes[None, :, 2:])
    wh = tf.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return tf.math.divide_no_nan(inter, area[None, :])


# ----------------------------------------------------------------------------- greedy merge
def match_score(boxes1, boxes2):
    """[N, M] match_score of section 4.3: the sum of a centre-distance term and an overlap term;
    the pair with the smallest score merges first.

    The paper says "the sum of the distance between centers of the two bounding boxes and the
    intersection area"; taken literally (pixels + pixels^2, growing with the overlap) disjoint boxes
    would merge before coincident ones, the opposite of the stated intent (coherent boxes fuse).
    We keep the sum of the two terms and make each a dissimilarity on one scale:
        ||c1 - c2|| / sqrt(sqrt(area1 * area2))  +  (1 - intersection / union),
    i.e. the centre distance in units of the boxes' (geometric-mean) side plus one minus the IoU;
    0 for identical boxes, >= 1 for disjoint ones.
    """
    b1 = tf.cast(boxes1, tf.float32)[:, None, :]
    b2 = tf.cast(boxes2, tf.float32)[None, :, :]
    c1 = (b1[..., :2] + b1[..., 2:]) / 2.0
    c2 = (b2[..., :2] + b2[..., 2:]) / 2.0
    dist = tf.norm(c1 - c2, axis=-1)
    a1 = tf.maximum(b1[..., 2] - b1[..., 0], 0.0) * tf.maximum(b1[..., 3] - b1[..., 1], 0.0)
    a2 = tf.maximum(b2[..., 2] - b2[..., 0], 0.0) * tf.maximum(b2[..., 3] - b2[..., 1], 0.0)
    wh = tf.maximum(tf.minimum(b1[..., 2:], b2[..., 2:]) - tf.maximum(b1[..., :2], b2[..., :2]), 0.0)
    inter = wh[..., 0] * wh[..., 1]
    iou = tf.math.divide_no_nan(inter, a1 + a2 - inter)
    side = tf.sqrt(tf.sqrt(a1 * a2))
    return tf.math.divide_no_nan(dist, side) + (1.0 - iou)


def greedy_merge(boxes, scores, classes, valid, threshold):
    """Greedy merge of one image's boxes (section 4.3 (d)-(g)), in the graph.

    Repeat: among the alive boxes of one class take the pair (i < j) with the smallest match_score;
    stop when it exceeds `threshold` (or no pair is left); else box i becomes box_merge(i, j) = the
    mean of the two boxes' coordinates, its confidence the sum of theirs (the class outputs of the
    windows behind it accumulate), and j dies. Ties go to the first pair in row-major (i, j) order.

    Args:
        boxes [N, 4], scores [N], classes int32 [N], valid bool [N] (padding is False).
    Returns (boxes [N, 4], scores [N], alive bool [N]); dead and padded slots keep their inputs.
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    n = tf.shape(boxes)[0]
    upper = tf.linalg.band_part(tf.ones([n, n], tf.bool), 0, -1) & ~tf.eye(n, dtype=tf.bool)
    same = tf.equal(classes[:, None], classes[None, :])
    inf = tf.constant(np.inf, tf.float32)

    def pair_scores(boxes, alive):
        allowed = upper & same & alive[:, None] & alive[None, :]
        return tf.where(allowed, match_score(boxes, boxes), inf)

    def cond(boxes, scores, alive, done):
        return ~done

    def body(boxes, scores, alive, done):
        table = tf.reshape(pair_scores(boxes, alive), [-1])
        flat = tf.argmin(table, output_type=tf.int32)
        best = tf.gather(table, flat)
        stop = ~(best <= threshold)  # also stops on inf (no pair) and NaN
        i, j = flat // n, flat % n
        merged = (boxes[i] + boxes[j]) / 2.0
        new_boxes = tf.tensor_scatter_nd_update(boxes, [[i]], merged[None])
        new_scores = tf.tensor_scatter_nd_update(scores, [[i]], [scores[i] + scores[j]])
        new_alive = tf.tensor_scatter_nd_update(alive, [[j]], [False])
        return (tf.where(stop, boxes, new_boxes), tf.where(stop, scores, new_scores),
                tf.where(stop, alive, new_alive), stop)

    def run():
        return tf.while_loop(cond, body, (boxes, scores, tf.cast(valid, tf.bool), tf.constant(False)),
                             maximum_iterations=n)[:3]

    # An image with no boxes has nothing to merge (argmin of an empty table has no answer).
    return tf.cond(n > 1, run, lambda: (boxes, scores, tf.cast(valid, tf.bool)))


def greedy_merge_numpy(boxes, scores, classes, threshold, score_fn=None):
    """The algorithm of section 4.3 on Python lists, one merge at a time (the tests' reference).

    `score_fn(b1, b2)` is the match score of two boxes (default: `match_score_numpy`). Returns the
    merged boxes, their summed scores and classes as lists, in the order of the surviving slots."""
    score_fn = score_fn or match_score_numpy
    items = [[np.asarray(b, np.float64), float(s), int(c), True]
             for b, s, c in zip(boxes, scores, classes)]
    while True:
        best = None
        for i, a in enumerate(items):
            for j in range(i + 1, len(items)):
                b = items[j]
                if not (a[3] and b[3]) or a[2] != b[2]:
                    continue
                value = score_fn(a[0], b[0])
                if best is None or value < best[0]:
                    best = (value, i, j)
        if best is None or best[0] > threshold:
            break
        _, i, j = best
        items[i][0] = (items[i][0] + items[j][0]) / 2.0
        items[i][1] += items[j][1]
        items[j][3] = False
    alive = [it for it in items if it[3]]
    return [it[0] for it in alive], [it[1] for it in alive], [it[2] for it in alive]


def match_score_numpy(b1, b2):
    """`match_score` for two boxes, written out with Python floats."""
    cx1, cy1 = (b1[0] + b1[2]) / 2, (b1[1] + b1[3]) / 2
    cx2, cy2 = (b2[0] + b2[2]) / 2, (b2[1] + b2[3]) / 2
    a1 = max(b1[2] - b1[0], 0) * max(b1[3] - b1[1], 0)
    a2 = max(b2[2] - b2[0], 0) * max(b2[3] - b2[1], 0)
    iw = max(min(b1[2], b2[2]) - max(b1[0], b2[0]), 0)
    ih = max(min(b1[3], b2[3]) - max(b1[1], b2[1]), 0)
    inter = iw * ih
    union = a1 + a2 - inter
    iou = inter / union if union > 0 else 0.0
    side = (a1 * a2) ** 0.25
    dist = ((cx1 - cx2) ** 2 + (cy1 - cy2) ** 2) ** 0.5
    return (dist / side if side > 0 else 0.0) + 1.0 - iou
