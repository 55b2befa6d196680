"""The weights store: a registry weights file from the cache, a local path or a download
(keras.utils.get_file), returned only after its sha256 is verified.

The checks on a file (sha256, the `.weights.h5`-only rule, loading) are in `kerasdet.weights_files`,
below the converters, which write such files.

Where files live:
  KERASDET_HOME      cache root (default ~/.kerasdet); weights go to KERASDET_HOME/weights/.
  KERASDET_WEIGHTS   a .weights.h5 file, or a folder holding files by their registry name,
                     checked before any download (for machines without internet). It may also
                     point at a published PyTorch checkpoint (or its folder) that an entry converts:
                     see kerasdet.zoo.pretrained, which keeps those in KERASDET_HOME/checkpoints/.
"""
import os

from kerasdet.weights_files import WeightsError, WeightsHashError, check_weights_suffix, sha256_of, verify_sha256

__all__ = ["cache_dir", "resolve_weights_file"]


def cache_dir():
    """KERASDET_HOME (default ~/.kerasdet), created on demand."""
    home = os.environ.get("KERASDET_HOME") or os.path.join(os.path.expanduser("~"), ".kerasdet")
    return os.path.abspath(home)


def _local_candidates(file_name, folder="weights"):
    """Where a file placed by hand is looked for: KERASDET_WEIGHTS (the file or its folder), then
    KERASDET_HOME/<folder>."""
    override = os.environ.get("KERASDET_WEIGHTS")
    if override:
        if os.path.isdir(override):
            yield os.path.join(override, file_name)
        elif os.path.basename(override) == file_name:
            yield override
    yield os.path.join(cache_dir(), folder, file_name)


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
    check_weights_suffix(file_name)
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

