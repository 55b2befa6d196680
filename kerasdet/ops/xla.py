"""XLA awareness for ops that have a faster non-XLA form or none at all.

`tf.function(jit_compile=True)` (Keras' ``jit_compile=True``) traces its body inside an XLA
control-flow context. Ops whose usual form has a data-dependent shape (``tf.where`` with one
argument, ``tf.boolean_mask``, ...) or no XLA kernel ask `in_xla_context()` at trace time and take a
fixed-shape form with the same numbers there; what has no such form raises `XLAUnsupportedError`,
which names the op and tells the user to compile with ``jit_compile=False``.
"""
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

__all__ = ["in_xla_context", "XLAUnsupportedError", "unsupported", "kernel_layer_supports_jit"]


class XLAUnsupportedError(ValueError):
    """Raised while tracing, under XLA, an op that XLA cannot compile."""


def in_xla_context():
    """True while tracing a function that XLA will compile (jit_compile=True, or nested in one)."""
    if tf.executing_eagerly():
        return False
    # TensorFlow's own test for this (used by its control flow); there is no public equivalent.
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def unsupported(what, hint=None):
    """An `XLAUnsupportedError` naming `what` (e.g. "RoIAlign with sampling_ratio=0: ...")."""
    message = f"XLA cannot compile {what}."
    if hint:
        message += f" {hint}"
    message += " Compile the model with jit_compile=False to run it without XLA."
    return XLAUnsupportedError(message)


def kernel_layer_supports_jit(compilable=None):
    """A ``supports_jit`` class attribute for layers that call the compiled kernels.

    Keras' ``jit_compile="auto"`` turns XLA on only when every layer's ``supports_jit`` is True, and
    ``jit_compile=True`` falls back to False otherwise. The kernels have no XLA implementation, so
    such a layer supports XLA only while the pure-TensorFlow fallbacks are traced
    (``_kernels.pure_tf()``, or no library), and only if ``compilable(layer)`` (its pure-TF form has
    fixed shapes with these settings). Keras assigns ``supports_jit = True`` in ``Layer.__init__``;
    the setter ignores it so that the answer stays computed.
    """
    from kerasdet.ops import _kernels

    def get(layer):
        return not _kernels.use_kernels() and (compilable is None or bool(compilable(layer)))

    return property(get, lambda layer, value: None)
