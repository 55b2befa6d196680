"""Feature Pyramid Network neck (Lin et al., "Feature Pyramid Networks for Object Detection", 2017).

For backbone maps C2..C5 (strides 4..32):
  L_k = 1x1 conv (``channels``) of C_k                                  (lateral connections)
  M_5 = L_5;  M_k = L_k + nearest_upsample(M_{k+1}, to the size of L_k)  (top-down pathway)
  P_k = 3x3 conv (``channels``) of M_k                                  (reduces upsampling aliasing)
  P_6 = max pool, kernel 1, stride 2, of P_5                            (the paper's extra RPN level)
Layer names follow Detectron2 ("fpn_lateral{k}", "fpn_output{k}").
"""
import keras
import tensorflow as tf

from kerasdet.layers.pointwise import PointwiseConv2D
from kerasdet.layers.winograd import WinogradConv2D
from kerasdet.ops.xla import in_xla_context


def upsample_nearest_to(x, reference):
    """Nearest-neighbour resize of ``x`` [B, h, w, C] to the spatial size of ``reference``.

    Output pixel i reads source pixel floor(i * h / H) (PyTorch's "nearest", used by the reference
    FPN implementations). For H = 2h it is exactly a 2x pixel repeat; for odd H = 2h - 1 (a stride-2
    conv with padding on an odd map) it is the 2x repeat cropped to H, so coarse pixel j stays on
    fine pixels 2j, 2j + 1. `tf.image.resize(method="nearest")` uses half-pixel centres instead,
    which shifts the odd case by one pixel, so the raw op with half_pixel_centers=False is used.
    """
    size = tf.shape(reference)[1:3]
    if in_xla_context():
        # XLA has no ResizeNearestNeighborGrad kernel; gathers of rows floor(i * h / H), then of
        # columns, are the same numbers and their gradient compiles.
        source = tf.shape(x)[1:3]
        rows = tf.range(size[0]) * source[0] // size[0]
        cols = tf.range(size[1]) * source[1] // size[1]
        return tf.gather(tf.gather(x, rows, axis=1), cols, axis=2)
    return tf.raw_ops.ResizeNearestNeighbor(images=x, size=size, align_corners=False, half_pixel_centers=False)


@keras.saving.register_keras_serializable(package="kerasdet")
class FPN(keras.layers.Layer):
    """FPN neck: dict {"C2".."C5"} -> dict {"P2".."P6"}.

    Args:
        channels: channels of every output level (256 in the paper).
        input_levels: backbone levels used, shallowest first (names "C<k>"); outputs are "P<k>".
        extra_pool_level: add "P<top+1>" by max pooling (kernel 1, stride 2) the top level.
        kernel_initializer: for all convs (Detectron2 uses Kaiming-uniform with a = 1).
    """

    def __init__(self, channels=256, input_levels=("C2", "C3", "C4", "C5"), extra_pool_level=True,
                 kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        if int(channels) != channels or channels < 1:
            raise ValueError(f"FPN: `channels` must be a positive integer, got {channels!r}")
        input_levels = tuple(input_levels)
        if not input_levels:
            raise ValueError("FPN: `input_levels` is empty")
        for name in input_levels:
            if not (isinstance(name, str) and name[:1] == "C" and name[1:].isdigit()):
                raise ValueError(f"FPN: `input_levels` must be names like 'C2', got {name!r}")
        ranks = [int(n[1:]) for n in input_levels]
        if ranks != list(range(ranks[0], ranks[0] + len(ranks))):
            raise ValueError(f"FPN: `input_levels` must be consecutive and shallowest first, got {input_levels}")
        self.channels = int(channels)
        self.input_levels = input_levels
        self.extra_pool_level = bool(extra_pool_level)
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or keras.initializers.VarianceScaling(1.0, "fan_in", "uniform"))
        self._ranks = ranks
        self.lateral_convs = [
            PointwiseConv2D(self.channels, kernel_initializer=self._init(), dtype=self.dtype_policy,
                            name=f"fpn_lateral{k}") for k in ranks]
        self.output_convs = [
            WinogradConv2D(self.channels, 3, padding="same", kernel_initializer=self._init(),
                                dtype=self.dtype_policy, name=f"fpn_output{k}") for k in ranks]
        self.extra_pool = keras.layers.MaxPooling2D(pool_size=1, strides=2, dtype=self.dtype_policy,
                                                    name=f"fpn_pool{ranks[-1] + 1}")

    def _init(self):
        return keras.initializers.get(keras.initializers.serialize(self.kernel_initializer))

    @property
    def output_levels(self):
        """Output names, shallowest first."""
        names = [f"P{k}" for k in self._ranks]
        if self.extra_pool_level:
            names.append(f"P{self._ranks[-1] + 1}")
        return names

    def output_strides(self, input_strides):
        """Strides of the outputs given the backbone's strides dict (the pooled level doubles the top)."""
        strides = {f"P{k}": int(input_strides[f"C{k}"]) for k in self._ranks}
        if self.extra_pool_level:
            strides[f"P{self._ranks[-1] + 1}"] = 2 * strides[f"P{self._ranks[-1]}"]
        return strides

    def _check_inputs(self, features, shapes_given=False):
        """Validates the input dict (of tensors, or of shapes when called from build)."""
        if not isinstance(features, dict):
            raise TypeError(f"FPN: expects a dict of feature maps {self.input_levels}, got {type(features).__name__}")
        missing = [n for n in self.input_levels if n not in features]
        if missing:
            raise ValueError(f"FPN: input dict lacks {missing}; it has {sorted(features)}")
        for n in self.input_levels:
            shape = tuple(features[n]) if shapes_given else tuple(features[n].shape)
            if len(shape) != 4:
                raise ValueError(f"FPN: feature {n!r} must be rank 4 [B, H, W, C], got shape {shape}")

    def build(self, input_shape):
        self._check_inputs(input_shape, shapes_given=True)
        for conv, name in zip(self.lateral_convs, self.input_levels):
            conv.build(input_shape[name])
        for conv in self.output_convs:
            conv.build((None, None, None, self.channels))
        self.built = True

    def call(self, features, training=None):
        self._check_inputs(features)
        laterals = [conv(features[n], training=training) for conv, n in zip(self.lateral_convs, self.input_levels)]
        merged = [None] * len(laterals)
        merged[-1] = laterals[-1]
        for i in range(len(laterals) - 2, -1, -1):
            merged[i] = laterals[i] + upsample_nearest_to(merged[i + 1], laterals[i])
        outputs = {f"P{k}": conv(m, training=training) for k, conv, m in zip(self._ranks, self.output_convs, merged)}
        if self.extra_pool_level:
            top = f"P{self._ranks[-1]}"
            outputs[f"P{self._ranks[-1] + 1}"] = self.extra_pool(outputs[top])
        return outputs

    def compute_output_shape(self, input_shape):
        shapes = {}
        for k, n in zip(self._ranks, self.input_levels):
            b, h, w = tuple(input_shape[n])[:3]
            shapes[f"P{k}"] = (b, h, w, self.channels)
        if self.extra_pool_level:
            b, h, w, c = shapes[f"P{self._ranks[-1]}"]
            half = lambda d: None if d is None else (d + 1) // 2  # noqa: E731
            shapes[f"P{self._ranks[-1] + 1}"] = (b, half(h), half(w), c)
        return shapes

    def get_config(self):
        config = super().get_config()
        config.update({
            "channels": self.channels,
            "input_levels": list(self.input_levels),
            "extra_pool_level": self.extra_pool_level,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
