"""Files that appear whole or not at all: written under a temporary name in the target's folder,
flushed to disk, then renamed over the target (a rename within one file system is atomic). A process
killed mid-write leaves the previous file (or none), never a truncated one that a later run would
accept. Used for checkpoints, converted weights and their records, and proposal caches."""
import contextlib
import os
import uuid

__all__ = ["replaced_atomically"]


@contextlib.contextmanager
def replaced_atomically(path):
    """Yields a temporary path next to ``path`` to write; on a clean exit it is synced and renamed
    to ``path``, on an error removed. The temporary name is hidden (leading dot), unique to the
    process and keeps ``path``'s suffixes (Keras insists on `.weights.h5`)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, dot, suffixes = name.partition(".")
    partial = os.path.join(folder, f".{stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{dot}{suffixes}")
    try:
        yield partial
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
