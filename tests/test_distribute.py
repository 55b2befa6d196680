"""Training under tf.distribute gives the one-device update.

MirroredStrategy over two logical CPU devices (set in a subprocess: logical devices must be
configured before TensorFlow starts) trains a tiny Faster R-CNN and a tiny Mask R-CNN for 3 steps
on a global batch of 2; the weights must equal those of one device on the same batches. Two
controls show the comparison can fail: without the division of the loss by the replica count the
update is about twice as large, and with per-replica loss normalizers (each replica dividing by its
own count of sampled anchors / RoIs) the update differs slightly.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from run_setup import h5_arrays, write_cli_setup

SCRIPT = os.path.join(os.path.dirname(__file__), "distribute_runs", "mirrored_steps.py")
# Measured here: mirrored vs one device 1.5e-8 (Faster) / 7e-9 (Mask R-CNN), float32 summation
# order only; the controls differ by 1.9e-2 (no replica scaling) and 1.1e-4 (local normalizers).
SAME_TOLERANCE = 1e-6
CONTROL_MINIMUM = 1e-5


def run_modes(kind, out_dir, *modes):
    result = subprocess.run([sys.executable, SCRIPT, kind, str(out_dir), *modes],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def max_weight_difference(out_dir, mode):
    reference, other = np.load(out_dir / "single.npz"), np.load(out_dir / f"{mode}.npz")
    assert sorted(reference.files) == sorted(other.files)
    return max(float(np.max(np.abs(reference[k] - other[k]))) for k in reference.files)


@pytest.fixture(scope="module")
def faster_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("mirrored_faster")
    run_modes("faster", out_dir, "single", "mirrored", "unscaled")
    run_modes("faster", out_dir, "local_norm")
    return out_dir


def test_mirrored_faster_rcnn_equals_one_device(faster_runs):
    assert max_weight_difference(faster_runs, "mirrored") < SAME_TOLERANCE


def test_control_without_replica_scaling_differs(faster_runs):
    assert max_weight_difference(faster_runs, "unscaled") > CONTROL_MINIMUM


def test_control_with_per_replica_normalizers_differs(faster_runs):
    assert max_weight_difference(faster_runs, "local_norm") > CONTROL_MINIMUM


def test_mirrored_mask_rcnn_equals_one_device(tmp_path):
    run_modes("mask", tmp_path, "single", "mirrored", "unscaled")
    assert max_weight_difference(tmp_path, "mirrored") < SAME_TOLERANCE
    assert max_weight_difference(tmp_path, "unscaled") > CONTROL_MINIMUM


# -- many machines: two worker processes on this machine -------------------------------------------
# Every labelled anchor and RoI is sampled (see distribute_runs/mirrored_steps.py), so a worker's
# samples do not depend on how the random draw is split; the data pipeline shards the records after
# the shuffle and keeps each sample's augmentation draw (kerasdet.data.pipeline, `shard`).
TAKE_ALL = {"num_classes": 3, "backbone": "tiny", "fpn_channels": 16, "fc_dim": 32,
            "anchor_sizes": [[16], [32], [64], [128], [256]], "rpn_batch_size": 2048,
            "rpn_pre_nms_top_k_train": 100, "rpn_post_nms_top_k_train": 16,
            "roi_batch_size": 64, "roi_positive_fraction": 0.5,
            "rpn_pre_nms_top_k_test": 100, "rpn_post_nms_top_k_test": 50, "seed": 0}
GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """8 training and 4 validation images of 64 x 64 (COCO layout) and a tiny Faster R-CNN config."""
    return write_cli_setup(tmp_path_factory.mktemp("multi_worker"), TAKE_ALL)


def free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def train_command(data, out, epochs, *extra):
    return [sys.executable, "-m", "kerasdet.cli", "train", data["config"], "--data", data["spec"],
            "--out", str(out), "--epochs", str(epochs), "--batch-size", str(GLOBAL_BATCH),
            "--lr", "0.02", "--warmup-steps", "0", "--seed", "0", "--quiet", *extra]


def worker_env(ports, index):
    import json

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                   "task": {"type": "worker", "index": index}})
    return env


def start_workers(data, out, epochs, *extra):
    ports = free_ports(2)
    return [subprocess.Popen(train_command(data, out, epochs, "--strategy", "multi-worker", *extra),
                             env=worker_env(ports, i), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(processes, timeout=900):
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-4000:]
    return outputs


def run_single(data, out, epochs, *extra):
    result = subprocess.run(train_command(data, out, epochs, *extra), capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def max_file_difference(a, b):
    first, second = h5_arrays(a), h5_arrays(b)
    assert sorted(first) == sorted(second) and first
    return max(float(np.max(np.abs(first[k] - second[k]))) for k in first)


def test_two_workers_equal_one_process_and_only_the_chief_writes(cli_data, tmp_path):
    run_single(cli_data, tmp_path / "single", 2)
    outputs = finish(start_workers(cli_data, tmp_path / "multi", 2))
    assert "worker 0 of 2 workers (chief" in outputs[0] and "worker 1 of 2 workers" in outputs[1]
    # One-process and two-worker weights after 2 epochs x 2 steps of a global batch of 4.
    assert max_file_difference(tmp_path / "single" / "model.weights.h5",
                               tmp_path / "multi" / "model.weights.h5") < SAME_TOLERANCE
    # The chief wrote the run folder (and evaluated); worker 1 printed no run summary.
    written = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert {"model.weights.h5", "run.json", "history.csv", "checkpoints", "metrics.json"} <= set(written)
    assert "classes (" in outputs[0] and "classes (" not in outputs[1]


def test_killed_worker_pair_resumes_from_the_backup(cli_data, tmp_path):
    import shutil
    import signal
    import time

    out = tmp_path / "run"
    workers = start_workers(cli_data, out, 3)
    metadata = out / "backup" / "training_metadata.json"
    deadline = time.time() + 600
    while not metadata.exists() and time.time() < deadline and workers[1].poll() is None:
        time.sleep(0.5)
    assert metadata.exists(), "the chief wrote no backup after its first epoch"
    workers[1].send_signal(signal.SIGKILL)  # a machine lost mid-run
    try:
        workers[0].wait(timeout=120)  # the chief fails on the missing peer, or hangs in a collective
    except subprocess.TimeoutExpired:
        workers[0].kill()
    for w in workers:
        w.communicate()
    assert workers[0].returncode != 0 or not (out / "model.weights.h5").exists()
    # The same backup, resumed by one process: the reference for the resumed pair.
    shutil.copytree(out / "backup", tmp_path / "reference" / "backup")
    resumed = finish(start_workers(cli_data, out, 3, "--resume"))
    run_single(cli_data, tmp_path / "reference", 3, "--resume")
    assert max_file_difference(out / "model.weights.h5",
                               tmp_path / "reference" / "model.weights.h5") < SAME_TOLERANCE
    assert "worker 1 of 2 workers" in resumed[1]


def test_multi_worker_needs_a_valid_tf_config(monkeypatch):
    from kerasdet.engine.distribute import make_strategy, worker_role

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        make_strategy("multi-worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="not a valid cluster description"):
        make_strategy("multi-worker")
    with pytest.raises(ValueError, match="unknown --strategy 'ring'"):
        make_strategy("ring")
    assert make_strategy("none") is None
    assert worker_role(None).is_chief and worker_role(None).num_workers == 1


def test_shards_of_the_training_stream_make_up_the_global_batch(cli_data):
    from kerasdet.data.data_spec import parse_data_spec
    from kerasdet.data.pipeline import build_dataset

    data = parse_data_spec(cli_data["spec"])
    settings = dict(training=True, image_size=(64, 64), seed=5)
    whole = next(iter(build_dataset(data.train, 4, **settings)))
    parts = [next(iter(build_dataset(data.train, 2, shard=(2, i), **settings))) for i in range(2)]
    # Sample j of the single stream is sample j // 2 of shard j % 2, with the same flip draw.
    order = [parts[j % 2]["image_index"][j // 2] for j in range(4)]
    np.testing.assert_array_equal(whole["image_index"].numpy(), np.array(order))
    images = np.stack([parts[j % 2]["images"][j // 2] for j in range(4)])
    np.testing.assert_array_equal(whole["images"].numpy(), images)
    with pytest.raises(ValueError, match="shard must be"):
        build_dataset(data.train, 2, shard=(2, 2), **settings)
