"""Weights files on disk: their sha256, the check before a file is read, and the one accepted format.

Only Keras `.weights.h5` files are accepted (HDF5 arrays; nothing executable, unlike pickles), and a
file with an expected sha256 is hashed before anything reads it: a file whose hash differs is never
handed to Keras. This sits below every package that writes or reads such files (the converters
write them, the zoo's store fetches and caches them), so neither has to import the other.
"""
import hashlib
import os

__all__ = ["WeightsError", "WeightsHashError", "WEIGHTS_SUFFIX", "sha256_of", "verify_sha256",
           "check_weights_suffix", "load_verified_weights"]

WEIGHTS_SUFFIX = ".weights.h5"


class WeightsError(RuntimeError):
    """A weights file could not be found, fetched or accepted."""


class WeightsHashError(WeightsError):
    """A weights file's sha256 is not the expected one (the file is not loaded)."""


def sha256_of(path, chunk_size=1 << 20):
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path, expected):
    """Raises WeightsHashError naming the file, the expected and the actual hash on a mismatch."""
    if not expected:
        raise WeightsError(f"no sha256 recorded for {path}: refusing to load an unverified file")
    actual = sha256_of(path)
    if actual != expected.lower():
        raise WeightsHashError(
            f"sha256 mismatch for weights file {path}: expected {expected.lower()}, got {actual}. "
            "The file is corrupted or not the one the registry names; it was not loaded. Delete it "
            "and fetch it again.")
    return path


def check_weights_suffix(name, what="weights file"):
    """Raises WeightsError unless ``name`` ends in .weights.h5."""
    if not str(name).endswith(WEIGHTS_SUFFIX):
        raise WeightsError(f"{what} {name!r} is not a Keras '{WEIGHTS_SUFFIX}' file; only that format is "
                           "accepted (no pickles, no full-model files)")


def load_verified_weights(model, path, sha256=None):
    """Loads a .weights.h5 file into a built model; verifies ``sha256`` first when given."""
    check_weights_suffix(os.path.basename(path))
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist")
    if sha256 is not None:
        verify_sha256(path, sha256)
    try:
        model.load_weights(path)
    except Exception as error:
        raise WeightsError(f"could not load weights file {path} into {type(model).__name__} "
                           f"{model.name!r}: {error}") from error
    return model
