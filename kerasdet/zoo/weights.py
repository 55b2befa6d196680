"""The weights store: download (keras.utils.get_file) into a cache, verify sha256, then load.

Only Keras `.weights.h5` files are accepted (HDF5 arrays; nothing executable, unlike pickles), and
a file is hashed before anything reads it: a file whose sha256 differs from the registry's is
never handed to Keras.

Where files live:
  KERASDET_HOME      cache root (default ~/.kerasdet); weights go to KERASDET_HOME/weights/.
  KERASDET_WEIGHTS   a .weights.h5 file, or a folder holding files by their registry name,
                     checked before any download (for machines without internet).
"""
import hashlib
import os

__all__ = ["WeightsError", "WeightsHashError", "cache_dir", "sha256_of", "verify_sha256",
           "resolve_weights_file", "load_verified_weights"]

_SUFFIX = ".weights.h5"


class WeightsError(RuntimeError):
    """A weights file could not be found, fetched or accepted."""


class WeightsHashError(WeightsError):
    """A weights file's sha256 is not the expected one (the file is not loaded)."""


def cache_dir():
    """KERASDET_HOME (default ~/.kerasdet), created on demand."""
    home = os.environ.get("KERASDET_HOME") or os.path.join(os.path.expanduser("~"), ".kerasdet")
    return os.path.abspath(home)


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


def _check_suffix(name, what):
    if not str(name).endswith(_SUFFIX):
        raise WeightsError(f"{what} {name!r} is not a Keras '{_SUFFIX}' file; only that format is "
                           "accepted (no pickles, no full-model files)")


def _local_candidates(file_name):
    override = os.environ.get("KERASDET_WEIGHTS")
    if override:
        if os.path.isdir(override):
            yield os.path.join(override, file_name)
        elif os.path.basename(override) == file_name:
            yield override
    yield os.path.join(cache_dir(), "weights", file_name)


def _is_plain_path(url):
    return "://" not in url


def resolve_weights_file(url, sha256, file_name=None, base_dir=None):
    """Finds or downloads a weights file and returns its verified local path.

    Args:
      url: http(s):// or file:// URL, or a local path (relative paths are taken from ``base_dir``).
      sha256: expected hex digest; required.
      file_name: cache file name (default: the URL's last component); must end in .weights.h5.
      base_dir: folder that relative paths are relative to (the zoo folder for shipped weights).

    Order: KERASDET_WEIGHTS, the cache, a local path, then a download of the URL (http(s)://,
    file://) with keras.utils.get_file into KERASDET_HOME/weights. Every candidate is hashed
    before use.
    """
    file_name = file_name or os.path.basename(url.split("?")[0])
    _check_suffix(file_name, "weights file")
    for candidate in _local_candidates(file_name):
        if os.path.isfile(candidate):
            return verify_sha256(candidate, sha256)
    if _is_plain_path(url):
        path = url
        if not os.path.isabs(path) and base_dir:
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise WeightsError(f"weights file {path} does not exist (registry source {url!r}); "
                               f"place '{file_name}' in {os.path.join(cache_dir(), 'weights')} or set "
                               "KERASDET_WEIGHTS to the file or its folder")
        return verify_sha256(path, sha256)
    import keras

    target = os.path.join(cache_dir(), "weights")
    os.makedirs(target, exist_ok=True)
    try:
        # file_hash makes get_file re-download a cached file that does not match; the explicit
        # verify below is the guarantee (get_file's check also runs after the download).
        path = keras.utils.get_file(fname=file_name, origin=url, file_hash=sha256,
                                    hash_algorithm="sha256", cache_dir=cache_dir(),
                                    cache_subdir="weights")
    except ValueError as error:  # get_file's own check after the download: hash mismatch
        downloaded = os.path.join(target, file_name)
        actual = sha256_of(downloaded) if os.path.isfile(downloaded) else "unknown"
        if os.path.isfile(downloaded):
            os.remove(downloaded)  # never leave a bad file where the cache lookup would find it
        raise WeightsHashError(
            f"sha256 mismatch for weights file {file_name} downloaded from {url}: expected "
            f"{sha256.lower()}, got {actual}; the file was deleted and not loaded") from error
    except Exception as error:  # URL fetch failures (get_file wraps URLError / HTTPError)
        raise WeightsError(
            f"could not download weights {file_name!r} from {url}: {error}. Offline? Download the "
            f"file elsewhere and place it at {os.path.join(target, file_name)}, or set "
            "KERASDET_WEIGHTS to the file (or to a folder holding it).") from error
    return verify_sha256(path, sha256)


def load_verified_weights(model, path, sha256=None):
    """Loads a .weights.h5 file into a built model; verifies ``sha256`` first when given."""
    _check_suffix(os.path.basename(path), "weights file")
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
