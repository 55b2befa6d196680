"""The callbacks of a training run: the NaN guard, per-epoch checkpoints of good epochs only, the
resume state, and TensorBoard when it is installed."""
import json
import math
import os
import shutil
import sys

import keras

from kerasdet.atomic_files import replaced_atomically

__all__ = ["StopOnNaN", "EpochCheckpoint", "GuardedBackupAndRestore", "tensorboard_callbacks",
           "save_weights_atomically", "copy_atomically", "DEFAULT_BACKUP_STEPS"]

# BackupAndRestore's step frequency: a run killed mid-epoch repeats at most this many steps.
DEFAULT_BACKUP_STEPS = 100
_WEIGHTS_SUFFIX = ".weights.h5"


def save_weights_atomically(model, path):
    """model.save_weights through kerasdet.atomic_files: a process killed during the save leaves
    the previous file (or none), never a truncated one under ``path``."""
    with replaced_atomically(path) as partial:
        model.save_weights(partial)


def copy_atomically(source, path):
    """shutil.copyfile through kerasdet.atomic_files (see save_weights_atomically)."""
    with replaced_atomically(path) as partial:
        shutil.copyfile(source, partial)


def _write_text_atomically(path, text):
    with replaced_atomically(path) as partial:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first non-finite loss, naming the step; checkpoint writers consult
    ``stopped`` so that the poisoned weights are never saved."""

    def __init__(self, last_good_path=None):
        super().__init__()
        self.stopped = False
        self.message = None
        self.last_good_path = last_good_path
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)) or self.stopped:
            return
        per_epoch = (self.params or {}).get("steps") or 0
        step = self._epoch * per_epoch + batch + 1  # 1-based count of training steps
        where = (f"the last good checkpoint is {self.last_good_path}"
                 if self.last_good_path and os.path.isfile(self.last_good_path)
                 else "no epoch finished before it, so there is no good checkpoint")
        self.message = (f"non-finite loss ({loss}) at training step {step} (epoch {self._epoch + 1}, "
                        f"batch {batch + 1}): training stopped; {where}")
        print("\n" + self.message, file=sys.stderr)
        self.stopped = True
        self.model.stop_training = True


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes OUT/checkpoints/epoch_NNN.weights.h5 and last_good.weights.h5 after each epoch that
    ended with finite losses (ModelCheckpoint would also save the weights of a NaN epoch)."""

    def __init__(self, folder, guard):
        super().__init__()
        self.folder = folder
        self.guard = guard
        os.makedirs(folder, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.stopped:
            return
        path = os.path.join(self.folder, f"epoch_{epoch + 1:03d}.weights.h5")
        save_weights_atomically(self.model, path)
        copy_atomically(path, os.path.join(self.folder, "last_good.weights.h5"))


class GuardedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that does not back up the state of an epoch that hit a NaN loss.

    ``writer=False`` (the non-chief workers of a multi-worker run) only restores: it reads the
    chief's backup at the start and never writes or deletes it.

    ``save_freq``: "epoch", or a number of steps: the state is also saved every that many steps, so
    a run killed mid-epoch loses at most that many (Keras restarts the interrupted epoch from its
    first step with the weights of the last save).

    Saves are atomic and self-consistent: the weights go to a new file named by a save counter,
    then training_metadata.json (written through a rename) points at it, then older weights files
    go. A process killed at any moment leaves a metadata file naming a complete weights file; the
    previous state stays until the next one is complete.
    """

    def __init__(self, backup_dir, guard, writer=True, save_freq="epoch"):
        super().__init__(backup_dir, save_freq=save_freq)
        self.guard = guard
        self.writer = writer
        self._saves = 0

    def _read_metadata(self):
        if not os.path.isfile(self._training_metadata_path):
            return None
        with open(self._training_metadata_path, encoding="utf-8") as handle:
            return json.load(handle)

    def _load_model(self):
        metadata = self._read_metadata()
        if metadata is None or "weights" not in metadata:
            return super()._load_model()  # no backup, or one written by plain BackupAndRestore
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, metadata["weights"]))
        self.model._initial_epoch = int(metadata["epoch"])
        self._saves = int(metadata.get("saves", 0))

    def _save_model(self):
        if self.guard.stopped:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        self._saves += 1
        name = f"state_{self._saves:08d}{_WEIGHTS_SUFFIX}"
        save_weights_atomically(self.model, os.path.join(self.backup_dir, name))
        step = int(self.model.optimizer.iterations.numpy()) if self.model.optimizer is not None else None
        _write_text_atomically(self._training_metadata_path, json.dumps(
            {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name,
             "saves": self._saves, "step": step}))
        for old in os.listdir(self.backup_dir):
            if old.startswith("state_") and old.endswith(_WEIGHTS_SUFFIX) and old != name:
                os.remove(os.path.join(self.backup_dir, old))

    def on_epoch_end(self, epoch, logs=None):
        if self.writer and not self.guard.stopped:
            super().on_epoch_end(epoch, logs)
            if self.save_freq != "epoch":  # Keras saves either per epoch or per steps: do both
                self._save_model()

    def on_train_batch_end(self, batch, logs=None):
        if self.writer:
            super().on_train_batch_end(batch, logs)

    def on_train_end(self, logs=None):
        if self.writer and not self.guard.stopped:  # keep the last good state for --resume
            super().on_train_end(logs)


def backup_step(backup_dir):
    """The training step (optimizer iterations) of the resume state in ``backup_dir``, or None."""
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        step = json.load(handle).get("step")
    return None if step is None else int(step)


class StopAtStep(keras.callbacks.Callback):
    """Ends fit when the optimizer has taken ``total`` steps: a run resumed mid-epoch restarts the
    interrupted epoch (Keras counts whole epochs) and would otherwise train, and move the learning
    rate schedule, past the run's end."""

    def __init__(self, total):
        super().__init__()
        self.total = int(total)

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total:
            self.model.stop_training = True


def tensorboard_callbacks(log_dir):
    """[TensorBoard callback], or [] with a warning when the tensorboard package is missing
    (tf.summary needs it; OUT/history.csv holds the same scalars)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        print("kerasdet: the tensorboard package is not installed; no TensorBoard logs "
              "(pip install tensorboard). Per-epoch losses go to history.csv.", file=sys.stderr)
        return []
    return [keras.callbacks.TensorBoard(log_dir, update_freq="epoch")]
