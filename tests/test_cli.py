"""The `kerasdet` command and the training driver: zoo listing, a short training run with
checkpoints and metrics.json, resume after an interruption, the NaN guard, predict, the scripts."""
import json
import os
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import cli
from kerasdet.zoo import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_classes": 3, "backbone": "tiny", "fpn_channels": 16, "fc_dim": 32,
        "anchor_sizes": [[16], [32], [64], [128], [256]], "rpn_batch_size": 32, "roi_batch_size": 32,
        "rpn_pre_nms_top_k_train": 100, "rpn_post_nms_top_k_train": 50,
        "rpn_pre_nms_top_k_test": 100, "rpn_post_nms_top_k_test": 50, "seed": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 64x64 synthetic COCO set (8 train, 4 val images) and a tiny model config file."""
    from kerasdet.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("cli")
    for split, count, seed in (("train", 8, 1), ("val", 4, 2)):
        make_dataset(str(root / split), count, seed=seed, image_size=(64, 64), split=split,
                     object_size=(12, 32))
    config = root / "tiny.json"
    config.write_text(json.dumps({"class": "kerasdet.models.faster_rcnn:FasterRCNN",
                                  "arguments": TINY, "input": {"image_size": [64, 64]}}))
    spec = f"coco:{root}/{{split}}/annotations/instances_{{split}}.json:{root}/{{split}}/images"
    return {"root": root, "config": str(config), "spec": spec}


def _pipelines(setup, batch_size=2):
    from kerasdet.zoo.data_spec import parse_data_spec

    data = parse_data_spec(setup["spec"])
    train_ds = training.make_pipeline(data.train, {"image_size": [64, 64]}, batch_size, True, seed=0)
    return data, train_ds.repeat()


def _recipe(epochs):
    return training.TrainingRecipe({}, epochs=epochs, batch_size=2, learning_rate=0.005,
                                   warmup_steps=2, decay_epochs=[epochs])


def test_zoo_subcommand_lists_describes_and_suggests(capsys):
    assert cli.main(["zoo", "list"]) == 0
    listing = capsys.readouterr().out
    assert "faster_rcnn_tiny_fpn_synthetic" in listing and "cascade_rcnn_r101" in listing
    assert cli.main(["zoo", "info", "faster_rcnn_r50_fpn"]) == 0
    assert json.loads(capsys.readouterr().out)["class"].endswith(":FasterRCNN")
    assert cli.main(["zoo", "info", "faster_rcnn_r50fpn"]) == 2
    assert "faster_rcnn_r50_fpn" in capsys.readouterr().err


def test_bad_data_spec_is_a_clear_error(setup, tmp_path, capsys):
    code = cli.main(["train", setup["config"], "--data", "imagenet:/nowhere", "--out", str(tmp_path)])
    assert code == 2 and "--data" in capsys.readouterr().err


def test_train_command_writes_checkpoints_logs_and_metrics(setup, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(out),
                     "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2", "--lr", "0.005",
                     "--warmup-steps", "2", "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["voc_map50"] <= 1.0 and 0.0 <= metrics["coco_ap"] <= 1.0
    assert {"epoch_001.weights.h5", "epoch_002.weights.h5", "last_good.weights.h5"} <= \
        set(os.listdir(out / "checkpoints"))
    assert (out / "model.weights.h5").is_file() and (out / "history.csv").is_file()
    assert any((out / "logs").rglob("events.out.tfevents*")), "no TensorBoard event files"
    assert len((out / "history.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert "VOC mAP@0.5" in capsys.readouterr().out


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill after epoch 1")


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs, self.start_weights = [], None

    def on_train_begin(self, logs=None):
        self.start_weights = [w.numpy().copy() for w in self.model.weights]

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def test_resume_continues_at_epoch_2_from_the_epoch_1_state(setup, tmp_path):
    out = str(tmp_path / "run")
    _, train_ds = _pipelines(setup)
    model = training.resolve_model(setup["config"], weights=None)
    with pytest.raises(KeyboardInterrupt):
        training.train_model(model, train_ds, out, _recipe(3), steps_per_epoch=2,
                             callbacks=[_Interrupt()], verbose=0)
    assert os.listdir(os.path.join(out, "checkpoints")) != []
    epoch1 = training.resolve_model(setup["config"], weights=os.path.join(out, "checkpoints",
                                                                          "epoch_001.weights.h5"))
    fresh = training.resolve_model(setup["config"], weights=None)
    recorder = _Recorder()
    run = training.train_model(fresh, train_ds, out, _recipe(3), steps_per_epoch=2, resume=True,
                               callbacks=[recorder], verbose=0)
    assert recorder.epochs == [1, 2]  # 0-based: epochs 2 and 3 run, epoch 1 is not repeated
    assert len(run["history"]["loss"]) == 2
    for restored, saved in zip(recorder.start_weights, epoch1.weights):
        np.testing.assert_array_equal(restored, saved.numpy())
    assert int(fresh.optimizer.iterations.numpy()) == 6  # the step count was restored too


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, tmp_path, capsys):
    out = str(tmp_path / "run")
    _, train_ds = _pipelines(setup)
    model = training.resolve_model(setup["config"], weights=None)
    honest = model.compute_detection_losses

    def poisoned(batch, training):
        losses = dict(honest(batch, training))
        # NaN from the 4th step on (optimizer iterations start at 0): epoch 2, batch 2.
        nan = tf.where(model.optimizer.iterations >= 3, float("nan"), 0.0)
        losses["roi_cls"] = losses["roi_cls"] + nan
        return losses

    model.compute_detection_losses = poisoned
    run = training.train_model(model, train_ds, out, _recipe(3), steps_per_epoch=2, verbose=0)
    assert run["stopped_on_nan"]
    assert "step 4 (epoch 2, batch 2)" in run["message"]
    assert "step 4" in capsys.readouterr().err
    checkpoints = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["epoch_001.weights.h5", "last_good.weights.h5"]
    assert not os.path.exists(os.path.join(out, "model.weights.h5"))
    with h5py.File(os.path.join(checkpoints, "last_good.weights.h5")) as handle:
        arrays = []
        handle.visititems(lambda name, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset)
                          else None)
    assert arrays and all(np.isfinite(a).all() for a in arrays)


def test_predict_command_writes_pngs_and_json(setup, tmp_path):
    from PIL import Image

    image = str(setup["root"] / "val" / "images" / "000000.png")
    big = str(tmp_path / "big.png")
    Image.open(image).resize((128, 96)).save(big)  # another size: boxes come back in its pixels
    out = tmp_path / "pred"
    assert cli.main(["predict", setup["config"], image, big, "--out", str(out), "--weights", "none",
                     "--score-threshold", "0"]) == 0
    records = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(r["output"]) for r in records] == ["000000.png", "big.png"]
    assert np.asarray(Image.open(out / "big.png")).shape == (96, 128, 3)
    boxes = np.array([d["box_xyxy"] for d in records[1]["detections"]])
    assert len(boxes) and boxes[:, 2].max() <= 128 + 1e-3 and boxes[:, 3].max() <= 96 + 1e-3


def test_train_scripts_share_the_cli():
    for script in ("train", "evaluate", "predict", "export"):
        proc = subprocess.run([sys.executable, os.path.join(REPO, "train", f"{script}.py"), "--help"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert f"kerasdet {script}" in proc.stdout


def test_data_spec_errors_name_the_missing_piece(setup, tmp_path):
    from kerasdet.zoo.data_spec import parse_data_spec

    with pytest.raises(FileNotFoundError, match="VOC folder"):
        parse_data_spec(f"voc:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        parse_data_spec(f"coco:{tmp_path}/missing_{{split}}.json:{tmp_path}")
    with pytest.raises(ValueError, match="coco:ANN.json:IMAGE_DIR"):
        parse_data_spec("coco:only_one_part.json")
    root = setup["root"]
    with pytest.warns(UserWarning, match="same images"):
        data = parse_data_spec(f"coco:{root}/val/annotations/instances_val.json:{root}/val/images")
    assert len(data.train) == len(data.val) == 4
    assert data.class_names == ["circle", "square", "triangle"]


def test_keras_file_is_accepted_as_model(setup, tmp_path):
    model = training.resolve_model(setup["config"], weights=None)
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    # A fresh interpreter, where no detector module was imported yet, must still read it.
    code = ("import sys; from kerasdet.zoo import training; "
            "m = training.resolve_model(sys.argv[1]); print(type(m).__name__, m.num_classes)")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["FasterRCNN", "3"]
