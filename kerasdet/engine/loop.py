"""The training loop: a data set's pipeline at a model's input settings, and `fit` with the recipe's
optimizer, checkpoints, resume state and the NaN guard.

A run writes into its output folder OUT:
    OUT/checkpoints/epoch_NNN.weights.h5, last_good.weights.h5   one per finished epoch
    OUT/backup/                          keras.callbacks.BackupAndRestore state (for --resume)
    OUT/logs/                            TensorBoard event files
    OUT/history.csv                      per-epoch losses
    OUT/model.weights.h5                 final weights (not written after a NaN loss)
Every weights file is written to a temporary name and renamed, so none is ever truncated.
"""
import os
import shutil
import sys

import keras
import tensorflow as tf

from kerasdet.engine.callbacks import (DEFAULT_BACKUP_STEPS, EpochCheckpoint, GuardedBackupAndRestore,
                                       StopAtStep, StopOnNaN, backup_step, save_weights_atomically,
                                       tensorboard_callbacks)
from kerasdet.engine.distribute import WorkerRole
from kerasdet.engine.recipe import make_optimizer


def named_input_error(error):
    """The BadInputError naming the file and record behind a TensorFlow error of the input
    pipeline, or None."""
    from kerasdet.data.pipeline import named_input_error as lookup

    return lookup(error)

__all__ = ["make_pipeline", "train_model", "check_output_folder", "checkpoint_bytes_needed"]


def check_output_folder(out_dir, needed_bytes=0):
    """Before training: ``out_dir`` can be created, written (a probe file is written, synced and
    removed) and its disk has ``needed_bytes`` free; otherwise an OSError naming the folder, so
    that a run does not train for hours and then fail at its first checkpoint."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_probe-{os.getpid()}")
        with open(probe, "wb") as handle:
            handle.write(b"kerasdet" * 512)
            handle.flush()
            os.fsync(handle.fileno())
        os.remove(probe)
    except OSError as exc:
        raise OSError(exc.errno, f"output folder {out_dir!r} is not writable: {exc.strerror or exc}; "
                                 "choose another --out") from exc
    free = shutil.disk_usage(out_dir).free
    if needed_bytes and free < needed_bytes:
        raise OSError(28, f"output folder {out_dir!r}: {free / 2**20:.1f} MiB free, but the run's "
                          f"checkpoints need about {needed_bytes / 2**20:.1f} MiB; free space or choose "
                          "another --out")


def checkpoint_bytes_needed(model, epochs):
    """Disk estimate of a run's files: one epoch checkpoint per epoch, last_good, the final weights
    and two backup states, each the model's variables and (backup) its optimizer's, plus 10 %."""
    weights = sum(int(v.numpy().nbytes) if hasattr(v, "numpy") else 0 for v in model.weights)
    optimizer = getattr(model, "optimizer", None)
    state = sum(int(v.numpy().nbytes) for v in optimizer.variables) if optimizer is not None else 0
    state = max(state, weights)  # an unbuilt optimizer has no slots yet; momentum needs one copy
    return int(1.1 * (weights * (int(epochs) + 2) + 2 * (weights + state)))


def make_pipeline(dataset, input_settings, batch_size, training, seed=0, with_masks=False, shard=None,
                  augment="default", proposals=None, max_proposals=2000, on_bad="error"):
    """The tf.data pipeline of a data set at a model's input settings (its ResizeRule);
    ``shard`` = (count, index) of a multi-worker run (see kerasdet.engine.distribute); ``augment``
    the recipe's training augmentation; ``proposals`` a proposal cache (or its path) that adds
    ``batch["proposals"]`` (kerasdet.data.proposals); ``on_bad`` what an image that fails to decode
    does: "error" stops naming it, "skip" drops it and counts it (kerasdet.data.pipeline)."""
    from kerasdet.data.pipeline import build_dataset

    extra = {} if proposals is None else {"proposals": proposals, "max_proposals": max_proposals}
    return build_dataset(dataset, batch_size, training=training, input_settings=input_settings,
                         seed=seed, with_masks=with_masks, shard=shard, augment=augment,
                         on_bad=on_bad, **extra)


def train_model(model, train_ds, out_dir, recipe, steps_per_epoch=None, val_ds=None, resume=False,
                callbacks=(), verbose=1, role=None, jit_compile="auto", backup_steps=DEFAULT_BACKUP_STEPS,
                exact_resume=False):
    """Compiles ``model`` with the recipe's optimizer and fits it with checkpoints, TensorBoard
    logs, BackupAndRestore and the NaN guard. Returns {"history", "stopped_on_nan", "message"}.

    ``role`` (kerasdet.engine.distribute.WorkerRole): in a multi-worker run only the chief writes
    (checkpoints, history.csv, logs, final weights, the backup); the others restore from the
    chief's backup on --resume and write nothing. Build and compile the model in the strategy's
    scope; ``train_ds`` may be a distributed data set (then give ``steps_per_epoch``).

    ``backup_steps``: the resume state is saved every that many steps as well as every epoch
    (None or 0: every epoch only); a killed run resumed with ``resume=True`` restarts the
    interrupted epoch from the last save's weights, optimizer state and learning-rate position, and
    stops after the run's epochs x steps_per_epoch optimizer steps in all. ``exact_resume`` (a
    tf.data.Dataset that repeats, with ``steps_per_epoch``): the resumed run also skips the batches
    the saved state had trained on, so it sees the batches an uninterrupted run would and, with a
    deterministic pipeline, ends with the same weights; the skipped batches are read and augmented
    (not trained on), which costs the input pipeline's share of the lost time.
    An image that fails to decode stops the run with a BadInputError naming its file and record."""
    role = role or WorkerRole()
    writer = role.is_chief
    if writer:
        check_output_folder(out_dir)
    if steps_per_epoch is None:
        if isinstance(train_ds, tf.distribute.DistributedDataset):
            raise ValueError("a distributed training data set needs steps_per_epoch")
        steps_per_epoch = int(train_ds.cardinality().numpy())
        if steps_per_epoch < 1:
            raise ValueError("the training dataset has unknown or zero length; pass steps_per_epoch")
    backup_dir = os.path.join(out_dir, "backup")
    if writer and not resume and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    if writer and resume and not os.path.isdir(backup_dir):
        print(f"--resume: no backup in {backup_dir}; starting from epoch 1", file=sys.stderr)
    checkpoints = os.path.join(out_dir, "checkpoints")
    guard = StopOnNaN(os.path.join(checkpoints, "last_good.weights.h5"))
    with model.distribute_strategy.scope():
        model.compile(optimizer=make_optimizer(recipe, steps_per_epoch), jit_compile=jit_compile)
        model.build()
    if writer:
        check_output_folder(out_dir, checkpoint_bytes_needed(model, recipe["epochs"]))
    all_callbacks = [guard]
    save_freq = int(backup_steps) if backup_steps else "epoch"
    if writer:
        all_callbacks += [EpochCheckpoint(checkpoints, guard),
                          GuardedBackupAndRestore(backup_dir, guard, save_freq=save_freq),
                          keras.callbacks.CSVLogger(os.path.join(out_dir, "history.csv"), append=resume),
                          *tensorboard_callbacks(os.path.join(out_dir, "logs"))]
    elif resume:
        all_callbacks.append(GuardedBackupAndRestore(backup_dir, guard, writer=False))
    all_callbacks += list(callbacks)
    resumed_at = backup_step(backup_dir) if resume else None
    if resumed_at:
        all_callbacks.append(StopAtStep(int(recipe["epochs"]) * steps_per_epoch))
        if exact_resume:
            if not isinstance(train_ds, tf.data.Dataset):
                raise ValueError("exact_resume needs a tf.data.Dataset (not a distributed one)")
            train_ds = train_ds.skip(resumed_at)
    try:
        history = model.fit(train_ds, epochs=int(recipe["epochs"]), steps_per_epoch=steps_per_epoch,
                            validation_data=val_ds, callbacks=all_callbacks, verbose=verbose)
    except tf.errors.OpError as error:
        named = named_input_error(error)
        if named is None:
            raise
        raise named from error
    if writer and not guard.stopped:
        save_weights_atomically(model, os.path.join(out_dir, "model.weights.h5"))
    return {"history": history.history, "stopped_on_nan": guard.stopped, "message": guard.message}
