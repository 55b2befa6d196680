"""Running a functional backbone with every frozen BN folded into the convolution before it.

A `FrozenBatchNormalization` after a convolution is a fixed per-channel affine map, so
conv(x, W) * s + t == conv(x, W * s) + t: the BN's full pass over the activations reduces to
scaling the kernel, a few thousand numbers, and a bias add that oneDNN fuses into the convolution
together with the ReLU and the residual add that follow. Faster R-CNN R50-FPN inference at
800 x 1216 took ~0.76x (bfloat16) and ~0.9x (float32) of the unfolded time on an Intel host, 0.86x
(bfloat16) on an AMD one (session measurements taking turns in one process; docs/SPEED.md).

The fold applies in training too: the frozen BN's statistics and affine parameters are constants,
so the gradient of the loss with respect to a kernel W is scale * (the gradient with respect to the
folded kernel), which autodiff derives through the product. It took ~0.95x of the float32 Faster
R-CNN R50-FPN training step at 800 x 1216 (6.29 against 6.64 s taking turns in one process, an
ad-hoc session script; docs/SPEED.md) by
removing a multiply and an add over every activation in the forward pass and a multiply in the
backward pass. tests/test_norm_folding.py checks the gradients against the layer-by-layer ones in
float64 (to 1e-9) and in float32 (same error against float64 as layer by layer, ~3e-6). An earlier
note here recorded one loaded run with a 3e-3 float32 error in conv1's gradient; that test's
randomized net and loss carry errors of that size either way (in an ad-hoc run at another seed,
1e-2 layer by layer on a layer4 kernel, 5e-4 folded), so it was not a fold error.

The layers and their weights are untouched: a model built from the graph's intermediate outputs
(``keras.Model(backbone.input, backbone.get_layer("conv1").output)``) still sees the convolution
without its BN, because only the backbone's own `call` folds. The fold uses Keras' functional
graph executor (`Functional._run_through_graph`, a private API); if that is missing in a Keras
version, `FoldsFrozenNorms` falls back to the ordinary call, and tests/test_norm_folding.py fails so
the slowdown does not go unnoticed.
"""
import functools

import keras
import tensorflow as tf

from kerasdet.layers.normalization import FrozenBatchNormalization
from kerasdet.layers.pointwise import PointwiseConv2D
from kerasdet.layers.winograd import WinogradConv2D
from kerasdet.ops.pointwise import pointwise_conv2d

try:  # Keras internals the fold runs through (see the module docstring).
    from keras.src.models.functional import operation_fn as _keras_operation_fn
    from keras.src.models.functional import unpack_singleton as _unpack_singleton
except ImportError:  # pragma: no cover - depends on the installed Keras
    _keras_operation_fn = None

__all__ = ["FoldsFrozenNorms", "foldable_pairs"]


# Exact types: a subclass may change what its call computes.
_FOLDABLE_CONVS = (keras.layers.Conv2D, PointwiseConv2D, WinogradConv2D)


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def foldable_pairs(model):
    """[(conv, bn)] for each plain `keras.layers.Conv2D` or `PointwiseConv2D` (channels-last, no
    activation, called once) whose output feeds only one `FrozenBatchNormalization` over the channel
    axis, of the same dtype policy, inside ``model``'s graph and not a model output."""
    consumers = {}
    nodes = [node for depth_nodes in model._nodes_by_depth.values() for node in depth_nodes]
    for node in nodes:
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    outputs = {id(t) for t in model.outputs}
    pairs = []
    for node in nodes:
        bn = node.operation
        if not isinstance(bn, FrozenBatchNormalization) or len(node.input_tensors) != 1:
            continue
        tensor = node.input_tensors[0]
        conv = _producer(tensor)
        if (type(conv) not in _FOLDABLE_CONVS or conv.data_format != "channels_last"
                or conv.activation is not keras.activations.linear
                or len(conv._inbound_nodes) != 1 or len(bn._inbound_nodes) != 1
                or consumers.get(id(tensor)) != 1 or id(tensor) in outputs
                or bn.axis not in (-1, len(tensor.shape) - 1)
                or bn.dtype_policy.name != conv.dtype_policy.name):
            continue
        pairs.append((conv, bn))
    return pairs


def _folded_conv(conv, bn):
    def call(inputs, training=None, **kwargs):
        with tf.name_scope(conv.name):
            dtype = conv.compute_dtype
            x = tf.convert_to_tensor(inputs)
            if x.dtype != dtype:
                x = tf.cast(x, dtype)
            # The product is formed in float32 (float64 for a float64 model) and rounded once to
            # the compute dtype.
            work = tf.float64 if dtype == "float64" else tf.float32
            scale, shift = (tf.cast(t, work) for t in bn.folded_scale_shift())
            kernel = tf.cast(conv.kernel, work) * scale
            if conv.use_bias:
                shift = shift + tf.cast(conv.bias, work) * scale
            kernel, shift = tf.cast(kernel, dtype), tf.cast(shift, dtype)
            if isinstance(conv, WinogradConv2D):  # the shift rides on the output transform's pass
                return conv.biased_convolution_op(x, kernel, shift, training=training)
            if isinstance(conv, PointwiseConv2D) and conv._uses_matmul_gradients(training):
                y = pointwise_conv2d(x, kernel)
            else:
                y = conv.convolution_op(x, kernel)
            return tf.nn.bias_add(y, shift)
    return call


def _identity(inputs, **kwargs):
    return inputs


class FoldsFrozenNorms:
    """Mixin for functional `keras.Model` subclasses: `call` folds each frozen BN into the
    convolution before it (see the module docstring). Set ``fold_frozen_norms = False`` on an
    instance to run the layers one by one."""

    fold_frozen_norms = True

    def _frozen_norm_folds(self):
        cached = self.__dict__.get("_kerasdet_norm_folds")
        if cached is None:
            pairs = foldable_pairs(self)
            cached = ({id(conv): _folded_conv(conv, bn) for conv, bn in pairs},
                      {id(bn) for _, bn in pairs})
            # Plain attribute, outside Keras' tracking: it is derived from the graph, not state.
            object.__setattr__(self, "_kerasdet_norm_folds", cached)
        return cached

    def call(self, inputs, training=None, mask=None, **kwargs):
        if not self.fold_frozen_norms or mask is not None or _keras_operation_fn is None:
            return super().call(inputs, training=training, mask=mask, **kwargs)
        convs, norms = self._frozen_norm_folds()
        if not convs:
            return super().call(inputs, training=training, mask=mask, **kwargs)

        def operation_fn(operation):
            if id(operation) in convs:
                return functools.partial(convs[id(operation)], training=training)
            if id(operation) in norms:
                return _identity
            return _keras_operation_fn(operation, training=training, **kwargs)

        outputs = self._run_through_graph(self._standardize_inputs(inputs), operation_fn=operation_fn)
        return _unpack_singleton(outputs)

