"""The parts every checkpoint converter shares: reading a PyTorch state dict, assigning it to Keras
variables through a key map, and saving the result as a verified `.weights.h5`.

A converter is a function ``key_map(model) -> {source_key: Target}``: for every weight of the Keras
model, the checkpoint key that fills it and how the array is laid out. `assign` then applies the map
all-or-nothing: before any variable is written it checks that every key is present, that no key of
the checkpoint is left over (except those a converter declares as having no counterpart) and that
every shape matches after the layout change, and raises one `ConversionError` listing all problems.
"""
import dataclasses
import os

import numpy as np

from kerasdet.weights_files import sha256_of

__all__ = ["ConversionError", "Target", "read_torch_checkpoint", "assign", "save_converted", "conv_kernel",
           "depthwise_kernel", "dense_kernel", "identity", "transposed_conv_kernel"]

TORCH_HINT = ("reading PyTorch checkpoints needs torch: pip install 'kerasdet[torch-weights]' "
              "(any CPU or CUDA build of torch >= 2.1)")


class ConversionError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys, or bad values."""


# Layout changes from PyTorch to Keras. Each takes and returns a numpy array.
def identity(value):
    return value


def conv_kernel(value):
    """Conv2d weight [out, in, kh, kw] -> Keras Conv2D kernel [kh, kw, in, out]."""
    return value.transpose(2, 3, 1, 0)


def depthwise_kernel(value):
    """Depthwise Conv2d weight [C, 1, kh, kw] -> Keras DepthwiseConv2D kernel [kh, kw, C, 1]."""
    return value.transpose(2, 3, 0, 1)


def transposed_conv_kernel(value):
    """ConvTranspose2d weight [in, out, kh, kw] -> Keras Conv2DTranspose kernel [kh, kw, out, in].

    Both ops scatter input pixel i to outputs i * stride + k with tap k, so no spatial flip is needed.
    """
    return value.transpose(2, 3, 1, 0)


def dense_kernel(value):
    """Linear weight [out, in] -> Keras Dense kernel [in, out]."""
    return value.T


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one checkpoint array goes: a Keras variable and the layout change to apply."""
    variable: object
    transform: object = identity

    @property
    def path(self):
        return self.variable.path


def read_torch_checkpoint(path):
    """A PyTorch checkpoint file as an ordered {key: float32/int numpy array}.

    Uses ``torch.load(weights_only=True)``, which refuses pickled code. Accepts a bare state dict or
    one wrapped under "model" / "state_dict" (the training-script formats); strips DataParallel's
    "module." prefix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"cannot read {path}: {TORCH_HINT}") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConversionError(f"{path} is not a readable PyTorch state dict: {error}") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and wrapper in loaded and isinstance(loaded[wrapper], dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(hasattr(v, "numpy") for v in loaded.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors "
                              f"(got {type(loaded).__name__})")
    state = {}
    for key, tensor in loaded.items():
        key = key[len("module."):] if key.startswith("module.") else key
        state[key] = tensor.detach().cpu().numpy()
    return state


def state_dict_and_source(state_dict_or_path):
    """(state dict, name for messages) of a converter's input: a checkpoint path (read with
    `read_torch_checkpoint`, named by its file name) or a state dict already in memory."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        return read_torch_checkpoint(state_dict_or_path), os.path.basename(os.fspath(state_dict_or_path))
    return state_dict_or_path, "state dict"


def assign(key_map, state_dict, source="checkpoint", ignore=(), skip_mismatch=False):
    """Copies ``state_dict`` into the variables of ``key_map`` ({key: Target}).

    Args:
        key_map: from a converter; it must cover every variable the caller wants filled.
        state_dict: {key: numpy array}, e.g. from `read_torch_checkpoint`.
        source: a name for messages (usually the checkpoint's file name).
        ignore: predicates or key prefixes for checkpoint keys with no Keras counterpart
            (e.g. BatchNorm's num_batches_tracked, a classifier the backbone drops).
        skip_mismatch: leave variables whose shape differs (a new number of classes) at their
            initialization instead of failing; missing keys are still an error.

    Returns:
        {"loaded": [keys], "skipped": [keys whose shapes differed (only with skip_mismatch)]}.
    Raises:
        ConversionError listing every missing key, unexpected key and shape mismatch, before any
        variable is written (nothing is loaded partially).
    """
    def ignored(key):
        return any(rule(key) if callable(rule) else key.startswith(rule) for rule in ignore)

    missing = sorted(k for k in key_map if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in key_map and not ignored(k))
    mismatched, skipped, values = [], [], {}
    for key, target in key_map.items():
        if key not in state_dict:
            continue
        value = np.asarray(target.transform(np.asarray(state_dict[key])))
        want = tuple(target.variable.shape)
        if tuple(value.shape) != want:
            if skip_mismatch:
                skipped.append(key)
                continue
            mismatched.append(f"{key} {tuple(value.shape)} -> {target.path} {want}")
            continue
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            mismatched.append(f"{key}: contains NaN or infinite values")
            continue
        values[key] = value
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape or value mismatches (after layout change): "
                        + "; ".join(mismatched))
    if problems:
        raise ConversionError(f"{source} does not fit the model; nothing was loaded. "
                              + " | ".join(problems))
    for key, value in values.items():
        variable = key_map[key].variable
        variable.assign(value.astype(variable.dtype))
    return {"loaded": list(values), "skipped": skipped}


def save_converted(model, path):
    """Saves ``model``'s weights as a `.weights.h5` file and returns its sha256 (for the zoo)."""
    path = os.fspath(path)
    if not path.endswith(".weights.h5"):
        raise ValueError(f"converted weights go to a '.weights.h5' file, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save_weights(path)
    return sha256_of(path)
