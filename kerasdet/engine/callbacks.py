"""The callbacks of a training run: the NaN guard, per-epoch checkpoints of good epochs only, the
resume state, and TensorBoard when it is installed."""
import math
import os
import shutil
import sys

import keras

__all__ = ["StopOnNaN", "EpochCheckpoint", "GuardedBackupAndRestore", "tensorboard_callbacks"]


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
        self.model.save_weights(path)
        shutil.copyfile(path, os.path.join(self.folder, "last_good.weights.h5"))


class GuardedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that does not back up the state of an epoch that hit a NaN loss.

    ``writer=False`` (the non-chief workers of a multi-worker run) only restores: it reads the
    chief's backup at the start and never writes or deletes it. Two copies of the state are kept
    (``double_checkpoint``), so a process killed while writing leaves the previous one readable.
    """

    def __init__(self, backup_dir, guard, writer=True):
        super().__init__(backup_dir, double_checkpoint=True)
        self.guard = guard
        self.writer = writer

    def on_epoch_end(self, epoch, logs=None):
        if self.writer and not self.guard.stopped:
            super().on_epoch_end(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self.writer:
            super().on_train_batch_end(batch, logs)

    def on_train_end(self, logs=None):
        if self.writer and not self.guard.stopped:  # keep the last good state for --resume
            super().on_train_end(logs)


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
