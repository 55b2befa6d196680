"""Lazy loading of the compiled kerasdet kernels, with a pure-TensorFlow fallback switch.

Every op in kerasdet.ops that has a compiled kernel asks ``use_kernels()`` at trace time and takes
either the kernel (``library().kerasdet_xxx``, e.g. ``kerasdet_roi_align`` for the op
``KerasDet>RoIAlign``) or its pure-TensorFlow twin, which computes the same numbers. The library is
looked for next to this file (``_lib/_kerasdet_ops.so``, written by ``custom_ops/build.py``) or at
``KERASDET_OPS_LIBRARY``. When TensorFlow sees a GPU and the CUDA build exists
(``_lib/_kerasdet_ops_gpu.so``, a superset with the GPU kernels), that one is loaded instead. It is used only when it was built for the
TensorFlow that is running: a missing or mismatched library gives one warning and the fallback,
never a crash, because a custom-op ABI break on a TensorFlow upgrade must not take a model down.

Environment:
    KERASDET_PURE_TF=1          always use the fallbacks (e.g. for a portable SavedModel).
    KERASDET_REQUIRE_KERNELS=1  a missing or mismatched library is an error instead of a warning.
    KERASDET_OPS_LIBRARY=PATH   load the library from PATH.
"""
import contextlib
import json
import os
import threading
import warnings

_LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")
_LIB_NAME = "_kerasdet_ops.so"
_GPU_LIB_NAME = "_kerasdet_ops_gpu.so"

_lock = threading.Lock()
_state = {"tried": False, "lib": None, "reason": None, "path": None}
# How many `pure_tf()` blocks are open, process-wide. Not thread-local on purpose: MirroredStrategy
# traces each replica's step in a thread of its own, and those threads must see the switch that the
# caller set around fit / export.
_pure_tf_depth = [0]


class KernelsUnavailableError(RuntimeError):
    """Raised instead of falling back when KERASDET_REQUIRE_KERNELS=1."""


class _OpLibrary:
    """The loaded op module, with each op also reachable as ``kerasdet_<snake_case>``.

    TensorFlow names the Python wrapper of ``KerasDet>RoIAlign`` ``keras_det_ro_i_align``; callers
    use the readable ``kerasdet_roi_align``. Names match after dropping "_" and lower-casing.
    """

    def __init__(self, module):
        self.module = module
        self._by_key = {}
        for name in dir(module):
            if name.startswith("keras_det_") and not name.endswith("_eager_fallback"):
                self._by_key[name.replace("_", "").lower()] = getattr(module, name)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self.module, name)
        except AttributeError:
            found = self._by_key.get(name.replace("_", "").lower())
            if found is None:
                raise AttributeError(f"the kerasdet op library has no op {name!r} (rebuild it with "
                                     "`make kernels`?)") from None
            return found

    def __dir__(self):
        return sorted(set(dir(self.module)) | set(self._by_key))


def _library_path():
    return os.environ.get("KERASDET_OPS_LIBRARY") or os.path.join(_LIB_DIR, _LIB_NAME)


def _try_load():
    import tensorflow as tf

    path = _library_path()
    _state["path"] = path
    if not os.path.exists(path):
        return None, (f"compiled kernels not found at {path} (build them with `make kernels` or "
                      "reinstall kerasdet with gcc available)")
    info_path = os.path.join(os.path.dirname(path), "_kerasdet_ops.json")
    info = {}
    try:
        with open(info_path) as f:
            info = json.load(f)
    except (OSError, ValueError):  # missing or unreadable: treated as built for an unknown version
        info = {}
    if not isinstance(info, dict):
        info = {}
    built_for = info.get("tensorflow")
    if built_for != tf.__version__:
        return None, (f"kernels at {path} were built for TensorFlow {built_for}, but "
                      f"{tf.__version__} is running; rebuild them with `make kernels`")
    candidates = [path]
    gpu_path = os.path.join(os.path.dirname(path), info.get("gpu_library") or _GPU_LIB_NAME)
    if (not os.environ.get("KERASDET_OPS_LIBRARY") and info.get("gpu_library")
            and os.path.exists(gpu_path) and tf.config.list_physical_devices("GPU")):
        # The GPU build holds every CPU kernel too; only one of the two may be loaded (the ops
        # would register twice), so the CPU library is the fallback if the GPU one fails.
        candidates.insert(0, gpu_path)
    reasons = []
    for candidate in candidates:
        _state["path"] = candidate
        try:
            return _OpLibrary(tf.load_op_library(candidate)), None
        except (tf.errors.NotFoundError, tf.errors.AlreadyExistsError, OSError) as err:
            # undefined symbol, wrong ABI, ops registered twice, ...
            reasons.append(f"kernels at {candidate} failed to load: {err}")
    return None, "; ".join(reasons)


def library():
    """The loaded op library, or None when the fallbacks are in use (after one warning)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                lib, reason = _try_load()
                _state.update(lib=lib, reason=reason, tried=True)
                if lib is None:
                    if os.environ.get("KERASDET_REQUIRE_KERNELS") == "1":
                        raise KernelsUnavailableError(reason)
                    warnings.warn(f"kerasdet: {reason}; using the pure-TensorFlow fallbacks "
                                  "(same results, slower).", RuntimeWarning, stacklevel=3)
    return _state["lib"]


def use_kernels():
    """True when ops traced now should call the compiled kernels."""
    if os.environ.get("KERASDET_PURE_TF") == "1" or _pure_tf_depth[0] > 0:
        return False
    return library() is not None


@contextlib.contextmanager
def pure_tf():
    """Within this block, ops are traced with their pure-TensorFlow fallbacks.

    A model traced here exports to a SavedModel made of builtin ops only, which TF Serving can load
    without the kerasdet library. The switch is process-wide (every thread tracing meanwhile sees
    it, including tf.distribute's replica threads); blocks nest.
    """
    with _lock:
        _pure_tf_depth[0] += 1
    try:
        yield
    finally:
        with _lock:
            _pure_tf_depth[0] -= 1


def register_gradients(functions):
    """tf.RegisterGradient(name)(fn) for each op name -> fn of the compiled ops. TensorFlow's registry
    refuses a second registration: when a module is reloaded, the first functions stay."""
    import tensorflow as tf

    for name, fn in functions.items():
        try:
            tf.RegisterGradient(name)(fn)
        except KeyError:
            pass


def status():
    """What was loaded, from where, and why not: for bug reports and `kerasdet` diagnostics."""
    library_loaded = False
    try:
        library_loaded = library() is not None
    except KernelsUnavailableError:
        pass
    return {"loaded": library_loaded, "path": _state["path"], "reason": _state["reason"],
            "pure_tf_forced": os.environ.get("KERASDET_PURE_TF") == "1"}


def _reset_for_tests():
    with _lock:
        _state.update(tried=False, lib=None, reason=None, path=None)
