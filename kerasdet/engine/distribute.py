"""Training on several devices and machines with tf.distribute.

`kerasdet train --strategy`:
    none          the default strategy (one device)
    mirrored      MirroredStrategy: every GPU of this machine (or its CPU), in-graph replicas
    multi-worker  MultiWorkerMirroredStrategy: one process per machine, the cluster described by the
                  TF_CONFIG environment variable (docs/DISTRIBUTED.md); one replica per device of
                  each worker

The batch size of a run is always the *global* batch, summed over all replicas, and the recipe's
learning rate follows it (kerasdet.engine.recipe.adapt_recipe); `Detector.train_step` makes N
replicas take the step one device would take on that batch.

Input: under multi-worker every worker builds its own pipeline
(`strategy.distribute_datasets_from_function`) reading only its shard of the records: the records
are shuffled alike on every worker (same seed) and worker i keeps samples i, i + n, ... *before
decoding* (`build_dataset(shard=...)`), so no image is decoded twice and the workers' batches
together are the batch a single process would have read. tf.data's own auto-sharding is therefore
switched off (AutoShardPolicy.OFF): the FILE policy does not apply to a list of image files read by
index, and the DATA policy would decode every image on every worker and drop most of them.

Writes: only the chief (worker 0) writes checkpoints, history.csv, TensorBoard logs, run.json and
the final weights; the other workers write nothing and restore a resumed run from the chief's
backup folder, which must therefore be on a file system all workers see (as for TensorFlow's own
multi-worker BackupAndRestore).
"""
import dataclasses
import json
import os

import tensorflow as tf

__all__ = ["STRATEGIES", "WorkerRole", "make_strategy", "worker_role", "distributed_pipeline"]

STRATEGIES = ("none", "mirrored", "multi-worker")


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """Where this process stands in a run: `is_chief` decides who writes."""
    task_type: str = "chief"
    task_id: int = 0
    num_workers: int = 1
    is_chief: bool = True

    def describe(self):
        if self.num_workers == 1:
            return "one worker"
        return (f"{self.task_type} {self.task_id} of {self.num_workers} workers"
                + (" (chief: writes checkpoints and logs)" if self.is_chief else
                   " (writes nothing; the chief writes)"))


def make_strategy(name):
    """The tf.distribute strategy named by `kerasdet train --strategy` (None for "none")."""
    if name in (None, "none"):
        return None
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        config = os.environ.get("TF_CONFIG")
        if not config:
            raise ValueError("--strategy multi-worker reads the cluster from the TF_CONFIG environment "
                             "variable, which is not set (see docs/DISTRIBUTED.md)")
        try:
            parsed = json.loads(config)
            parsed["cluster"], parsed["task"]["type"], parsed["task"]["index"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"TF_CONFIG is not a valid cluster description ({err}): {config!r}; "
                             "expected {\"cluster\": {\"worker\": [\"host:port\", ...]}, "
                             "\"task\": {\"type\": \"worker\", \"index\": I}}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown --strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def worker_role(strategy):
    """This process's WorkerRole under `strategy` (the chief of a one-process run without one)."""
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is None or not resolver.cluster_spec().as_dict():
        return WorkerRole()
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    num_workers = sum(len(cluster.get(kind, ())) for kind in ("chief", "worker"))
    # TensorFlow's rule: the "chief" task if the cluster has one, else worker 0.
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in cluster)
    return WorkerRole(task_type, task_id, num_workers, is_chief)


def distributed_pipeline(strategy, build, global_batch_size):
    """The training input under `strategy`.

    `build(batch_size, shard)` returns a tf.data pipeline of `batch_size` images; `shard` is None or
    (count, index). Without a strategy, or with one input pipeline (mirrored on one machine: Keras
    splits each global batch over the replicas), this is `build(global_batch_size, None)`.
    Otherwise each worker's pipeline is built by `strategy.distribute_datasets_from_function` with its
    shard and its per-replica batch.
    """
    if worker_role(strategy).num_workers == 1:
        return build(global_batch_size, None)
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(f"the batch size {global_batch_size} is the global batch of the run and must "
                         f"be a multiple of its {replicas} replicas")

    def per_worker(context):
        # Called once per worker; its local replicas take consecutive batches of its dataset.
        dataset = build(context.get_per_replica_batch_size(global_batch_size),
                        (context.num_input_pipelines, context.input_pipeline_id))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.with_options(options)

    return strategy.distribute_datasets_from_function(per_worker)
