"""Issue 18, faults: atomic checkpoints, SIGKILL mid-epoch and --resume, an unwritable or full output
folder, and the CLI's --on-bad on a data set with bad records. Tiny models, 64-px images."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from run_setup import h5_arrays, write_cli_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process: a tiny deterministic model trained by kerasdet's train_model on a repeated,
# seeded, augmented pipeline of the synthetic set; it prints the step after each batch so that the
# parent can kill it at a chosen one.
CHILD = textwrap.dedent('''
    import sys
    import keras
    import tensorflow as tf
    from kerasdet import engine
    from kerasdet.data.coco import load_coco

    out, resume = sys.argv[1], sys.argv[2] == "resume"
    keras.utils.set_random_seed(0)
    data = load_coco(sys.argv[3], sys.argv[4])


    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, strides=4, kernel_initializer=keras.initializers.GlorotUniform(1))
            self.head = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(2))

        def build(self, input_shape=None):
            self.conv.build((None, 64, 64, 3))
            self.head.build((None, 4))
            self.built = True

        def call(self, batch, training=False):
            features = tf.reduce_mean(self.conv(batch["images"] / 255.0), axis=[1, 2])
            return self.head(features)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            target = x["bounding_boxes"]["boxes"][:, 0] / 64.0
            return tf.reduce_mean(tf.square(y_pred - target))


    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            print("step", int(self.model.optimizer.iterations.numpy()), flush=True)


    train_ds = engine.make_pipeline(data, {"image_size": [64, 64]}, 2, True, seed=0).repeat()
    recipe = engine.TrainingRecipe({}, epochs=3, batch_size=2, learning_rate=0.05, warmup_steps=3,
                                   decay_epochs=[2])
    engine.train_model(Tiny(), train_ds, out, recipe, steps_per_epoch=4, resume=resume, verbose=0,
                       callbacks=[Progress()], jit_compile=False, backup_steps=1, exact_resume=True)
    print("done", flush=True)
''')


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_cli_setup(tmp_path_factory.mktemp("faults"), {
        "num_classes": 3, "backbone": "tiny", "fpn_channels": 16, "fc_dim": 32,
        "anchor_sizes": [[16], [32], [64], [128], [256]], "rpn_batch_size": 32, "roi_batch_size": 32,
        "rpn_pre_nms_top_k_train": 100, "rpn_post_nms_top_k_train": 50,
        "rpn_pre_nms_top_k_test": 100, "rpn_post_nms_top_k_test": 50, "seed": 0})


def _child(out, mode, setup, kill_at=None):
    root = setup["root"]
    args = [sys.executable, "-c", CHILD, str(out), mode,
            str(root / "train" / "annotations" / "instances_train.json"), str(root / "train" / "images")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.path.join(REPO, "tests"))
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    steps = []
    for line in process.stdout:
        if line.startswith("step"):
            steps.append(int(line.split()[1]))
            if kill_at is not None and steps[-1] == kill_at:
                os.kill(process.pid, signal.SIGKILL)
                break
    process.wait(timeout=300)
    if kill_at is None:
        assert process.returncode == 0, process.stderr.read()[-3000:]
    else:
        assert process.returncode == -signal.SIGKILL
    return steps


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(setup, tmp_path):
    """12 steps (3 epochs x 4); the child is killed with SIGKILL after a random step that is not an
    epoch end, resumed with resume=True, and its final weights compared with an uninterrupted run of
    the same seed: equal to float32 round-off (atol 1e-6; measured: bit-identical on CPU)."""
    whole = tmp_path / "whole"
    assert _child(whole, "fresh", setup) == list(range(1, 13))
    kill_at = random.Random().choice([s for s in range(2, 12) if s % 4])
    killed = tmp_path / "killed"
    _child(killed, "fresh", setup, kill_at=kill_at)
    metadata = json.loads((killed / "backup" / "training_metadata.json").read_text())
    # backup_steps=1: the state of the step before the kill (or the killed one) is on disk.
    assert kill_at - 1 <= metadata["step"] <= kill_at, (kill_at, metadata)
    assert not [n for n in os.listdir(killed / "backup") if ".partial" in n]
    resumed = _child(killed, "resume", setup)
    assert resumed == list(range(metadata["step"] + 1, 13)), resumed  # lost: kill_at - step <= 1
    expected, got = h5_arrays(whole / "model.weights.h5"), h5_arrays(killed / "model.weights.h5")
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, err_msg=key)


def test_a_save_killed_midway_leaves_no_truncated_checkpoint(tmp_path, monkeypatch):
    import keras

    from kerasdet.engine import callbacks

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "last_good.weights.h5")
    callbacks.save_weights_atomically(model, path)
    good = h5_arrays(path)

    def dies_midway(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as handle:
            handle.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 10)  # what a kill leaves: a truncated file
        raise KeyboardInterrupt("killed during the save")

    monkeypatch.setattr(keras.Model, "save_weights", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        callbacks.save_weights_atomically(model, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last_good.weights.h5"]  # no partial file left behind
    assert h5_arrays(path).keys() == good.keys()
    for key in good:
        np.testing.assert_array_equal(h5_arrays(path)[key], good[key])
    # The file a plain (non-atomic) save would have left is refused by load_weights, not accepted.
    truncated = tmp_path / "truncated.weights.h5"
    truncated.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(Exception):
        model.load_weights(str(truncated))


def test_backup_state_points_only_at_complete_files(tmp_path):
    """The resume state's metadata is written after its weights file and through a rename: it always
    names a complete file, and the previous state stays until the new one is complete."""
    import keras

    from kerasdet.engine.callbacks import GuardedBackupAndRestore, StopOnNaN

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    backup = GuardedBackupAndRestore(str(tmp_path / "backup"), StopOnNaN(), save_freq=1)
    backup.set_model(model)
    backup._save_model()
    first = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    backup._save_model()
    second = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert first["weights"] != second["weights"]
    assert sorted(os.listdir(tmp_path / "backup")) == sorted([second["weights"], "training_metadata.json"])
    with h5py.File(tmp_path / "backup" / second["weights"], "r"):
        pass


def test_unwritable_or_full_output_folder_is_reported_before_training(setup, tmp_path, monkeypatch,
                                                                       capsys):
    import shutil

    from kerasdet import cli
    from kerasdet.engine import loop

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(blocker / "run"),
                     "--epochs", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "a_file/run" in err and "not writable" in err
    with pytest.raises(OSError, match="not writable"):
        loop.check_output_folder(str(blocker / "run"))

    real = shutil.disk_usage
    monkeypatch.setattr(loop.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=5 * 2 ** 20))
    with pytest.raises(OSError, match=r"5.0 MiB free, but the run's checkpoints need about 8.0 MiB"):
        loop.check_output_folder(str(tmp_path / "full"), 8 * 2 ** 20)
    code = cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(tmp_path / "full"),
                     "--epochs", "1000", "--steps-per-epoch", "1", "--batch-size", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "MiB free" in err and not (tmp_path / "full" / "checkpoints").exists()


def test_cli_on_bad_lists_every_bad_record_or_skips_and_trains(tmp_path, capsys):
    from PIL import Image

    from kerasdet import cli

    setup = write_cli_setup(tmp_path / "data", {
        "num_classes": 3, "backbone": "tiny", "fpn_channels": 16, "fc_dim": 32,
        "anchor_sizes": [[16], [32], [64], [128], [256]], "rpn_batch_size": 32, "roi_batch_size": 32,
        "rpn_pre_nms_top_k_train": 100, "rpn_post_nms_top_k_train": 50,
        "rpn_pre_nms_top_k_test": 100, "rpn_post_nms_top_k_test": 50, "seed": 0})
    images = setup["root"] / "train" / "images"
    names = sorted(os.listdir(images))
    os.remove(images / names[0])                             # missing
    (images / names[1]).write_bytes(b"garbage")              # not an image
    corrupt = bytearray((images / names[2]).read_bytes())    # valid header, corrupt pixels
    corrupt[100:160] = b"\0" * 60
    (images / names[2]).write_bytes(bytes(corrupt))
    Image.open(images / names[2]).size  # the header still reads
    out = tmp_path / "run"
    args = ["train", setup["config"], "--data", setup["spec"], "--out", str(out), "--epochs", "1",
            "--batch-size", "2", "--lr", "0.005", "--warmup-steps", "1", "--quiet"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "2 bad record(s)" in err and names[0] in err and names[1] in err and "--on-bad skip" in err
    assert not (out / "checkpoints").exists()  # stopped before training

    assert cli.main(args + ["--on-bad", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "1 x missing, unreadable or wrong-size image skipped" not in printed  # two, counted
    assert "2 x missing, unreadable or wrong-size image skipped" in printed
    assert "1 x undecodable image skipped in the pipeline" in printed and names[2] in printed
    assert "the other records trained and evaluated" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["voc_map50"] <= 1.0 and (out / "model.weights.h5").is_file()


def test_cli_max_image_pixels_and_evaluate_names_an_undecodable_image(tmp_path, capsys):
    from kerasdet import cli
    from kerasdet.data import images as image_module

    setup = write_cli_setup(tmp_path / "data", {
        "num_classes": 3, "backbone": "tiny", "fpn_channels": 16, "fc_dim": 32,
        "anchor_sizes": [[16], [32], [64], [128], [256]], "rpn_pre_nms_top_k_test": 100,
        "rpn_post_nms_top_k_test": 50, "seed": 0})
    try:
        code = cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(tmp_path / "run"),
                         "--epochs", "1", "--quiet", "--max-image-pixels", "4000"])
    finally:
        image_module.set_max_image_pixels(None)
    err = capsys.readouterr().err
    assert code == 2 and "8 bad record(s)" in err and "the image declares 64 x 64" in err
    assert "limit of 4,000" in err

    images = setup["root"] / "val" / "images"
    name = sorted(os.listdir(images))[1]
    corrupt = bytearray((images / name).read_bytes())
    corrupt[100:160] = b"\0" * 60
    (images / name).write_bytes(bytes(corrupt))
    args = ["evaluate", setup["config"], "--weights", "none", "--data", setup["spec"], "--batch-size", "2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{name}): cannot decode the image during the run" in err and "record 1" in err
    assert cli.main(args + ["--on-bad", "skip"]) == 0
    out = capsys.readouterr().out
    assert "1 x undecodable image skipped in the pipeline" in out and name in out


def test_cli_exact_resume_needs_a_repeated_stream(setup, tmp_path, capsys):
    from kerasdet import cli

    code = cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(tmp_path / "run"),
                     "--epochs", "1", "--batch-size", "2", "--quiet", "--resume", "--exact-resume"])
    assert code == 2 and "--exact-resume needs --steps-per-epoch" in capsys.readouterr().err
