"""The training loop: a data set's pipeline at a model's input settings, and `fit` with the recipe's
optimizer, checkpoints, resume state and the NaN guard.

A run writes into its output folder OUT:
    OUT/checkpoints/epoch_NNN.weights.h5, last_good.weights.h5   one per finished epoch
    OUT/backup/                          keras.callbacks.BackupAndRestore state (for --resume)
    OUT/logs/                            TensorBoard event files
    OUT/history.csv                      per-epoch losses
    OUT/model.weights.h5                 final weights (not written after a NaN loss)
"""
import os
import shutil
import sys

import keras
import tensorflow as tf

from kerasdet.engine.callbacks import EpochCheckpoint, GuardedBackupAndRestore, StopOnNaN, tensorboard_callbacks
from kerasdet.engine.distribute import WorkerRole
from kerasdet.engine.recipe import make_optimizer

__all__ = ["make_pipeline", "train_model"]


def make_pipeline(dataset, input_settings, batch_size, training, seed=0, with_masks=False, shard=None,
                  augment="default", proposals=None, max_proposals=2000):
    """The tf.data pipeline of a data set at a model's input settings (its ResizeRule);
    ``shard`` = (count, index) of a multi-worker run (see kerasdet.engine.distribute); ``augment``
    the recipe's training augmentation; ``proposals`` a proposal cache (or its path) that adds
    ``batch["proposals"]`` (kerasdet.data.proposals)."""
    from kerasdet.data.pipeline import build_dataset

    extra = {} if proposals is None else {"proposals": proposals, "max_proposals": max_proposals}
    return build_dataset(dataset, batch_size, training=training, input_settings=input_settings,
                         seed=seed, with_masks=with_masks, shard=shard, augment=augment, **extra)


def train_model(model, train_ds, out_dir, recipe, steps_per_epoch=None, val_ds=None, resume=False,
                callbacks=(), verbose=1, role=None, jit_compile="auto"):
    """Compiles ``model`` with the recipe's optimizer and fits it with checkpoints, TensorBoard
    logs, BackupAndRestore and the NaN guard. Returns {"history", "stopped_on_nan", "message"}.

    ``role`` (kerasdet.engine.distribute.WorkerRole): in a multi-worker run only the chief writes
    (checkpoints, history.csv, logs, final weights, the backup); the others restore from the
    chief's backup on --resume and write nothing. Build and compile the model in the strategy's
    scope; ``train_ds`` may be a distributed data set (then give ``steps_per_epoch``)."""
    role = role or WorkerRole()
    writer = role.is_chief
    if writer:
        os.makedirs(out_dir, exist_ok=True)
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
    all_callbacks = [guard]
    if writer:
        all_callbacks += [EpochCheckpoint(checkpoints, guard), GuardedBackupAndRestore(backup_dir, guard),
                          keras.callbacks.CSVLogger(os.path.join(out_dir, "history.csv"), append=resume),
                          *tensorboard_callbacks(os.path.join(out_dir, "logs"))]
    elif resume:
        all_callbacks.append(GuardedBackupAndRestore(backup_dir, guard, writer=False))
    all_callbacks += list(callbacks)
    history = model.fit(train_ds, epochs=int(recipe["epochs"]), steps_per_epoch=steps_per_epoch,
                        validation_data=val_ds, callbacks=all_callbacks, verbose=verbose)
    if writer and not guard.stopped:
        model.save_weights(os.path.join(out_dir, "model.weights.h5"))
    return {"history": history.history, "stopped_on_nan": guard.stopped, "message": guard.message}
