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
from run_setup import h5_arrays, write_cli_setup
from kerasdet import engine
from kerasdet.engine import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"num_classes": 3, "backbone": "tiny", "fpn_channels": 16, "fc_dim": 32,
        "anchor_sizes": [[16], [32], [64], [128], [256]], "rpn_batch_size": 32, "roi_batch_size": 32,
        "rpn_pre_nms_top_k_train": 100, "rpn_post_nms_top_k_train": 50,
        "rpn_pre_nms_top_k_test": 100, "rpn_post_nms_top_k_test": 50, "seed": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 64x64 synthetic COCO set (8 train, 4 val images) and a tiny model config file."""
    return write_cli_setup(tmp_path_factory.mktemp("cli"), TINY)


def _pipelines(setup, batch_size=2):
    from kerasdet.data.data_spec import parse_data_spec

    data = parse_data_spec(setup["spec"])
    train_ds = engine.make_pipeline(data.train, {"image_size": [64, 64]}, batch_size, True, seed=0)
    return data, train_ds.repeat()


def _recipe(epochs):
    return engine.TrainingRecipe({}, epochs=epochs, batch_size=2, learning_rate=0.005,
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
    model = engine.resolve_model(setup["config"], weights=None)
    with pytest.raises(KeyboardInterrupt):
        engine.train_model(model, train_ds, out, _recipe(3), steps_per_epoch=2,
                             callbacks=[_Interrupt()], verbose=0)
    assert os.listdir(os.path.join(out, "checkpoints")) != []
    epoch1 = engine.resolve_model(setup["config"], weights=os.path.join(out, "checkpoints",
                                                                          "epoch_001.weights.h5"))
    fresh = engine.resolve_model(setup["config"], weights=None)
    recorder = _Recorder()
    run = engine.train_model(fresh, train_ds, out, _recipe(3), steps_per_epoch=2, resume=True,
                               callbacks=[recorder], verbose=0)
    assert recorder.epochs == [1, 2]  # 0-based: epochs 2 and 3 run, epoch 1 is not repeated
    assert len(run["history"]["loss"]) == 2
    for restored, saved in zip(recorder.start_weights, epoch1.weights):
        np.testing.assert_array_equal(restored, saved.numpy())
    assert int(fresh.optimizer.iterations.numpy()) == 6  # the step count was restored too


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, tmp_path, capsys):
    out = str(tmp_path / "run")
    _, train_ds = _pipelines(setup)
    model = engine.resolve_model(setup["config"], weights=None)
    honest = model.compute_detection_losses

    def poisoned(batch, training):
        losses = dict(honest(batch, training))
        # NaN from the 4th step on (optimizer iterations start at 0): epoch 2, batch 2.
        nan = tf.where(model.optimizer.iterations >= 3, float("nan"), 0.0)
        losses["roi_cls"] = losses["roi_cls"] + nan
        return losses

    model.compute_detection_losses = poisoned
    run = engine.train_model(model, train_ds, out, _recipe(3), steps_per_epoch=2, verbose=0)
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
    from kerasdet.data.data_spec import parse_data_spec

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
    model = engine.resolve_model(setup["config"], weights=None)
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    # A fresh interpreter, where no detector module was imported yet, must still read it.
    code = ("import sys; from kerasdet import engine; "
            "m = engine.resolve_model(sys.argv[1]); print(type(m).__name__, m.num_classes)")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["FasterRCNN", "3"]


# ----------------------------------------------------------------------------- custom data sets
def _coin_voc(root, count=10, seed=3, name="coin"):
    """A VOC-format folder with one custom class (synthetic circles renamed), split train / test."""
    from kerasdet.data.synthetic import make_dataset

    make_dataset(str(root), count, seed=seed, image_size=(64, 64), format="voc", num_classes=1,
                 split="all", object_size=(12, 28), write_instance_pngs=False)
    annotations = root / "Annotations"
    for xml in annotations.iterdir():
        xml.write_text(xml.read_text().replace("<name>circle</name>", f"<name>{name}</name>"))
    ids = sorted(p.stem for p in annotations.iterdir())
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[:-2]) + "\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids[-2:]) + "\n")
    return root


@pytest.fixture(scope="module")
def coin_run(setup, tmp_path_factory):
    """One `kerasdet train` on the coin set: discovered classes, --min-size / --max-size on a model
    whose config says image_size, --batch-size without --lr, --anchor-sizes auto."""
    root = tmp_path_factory.mktemp("coin")
    voc = _coin_voc(root / "voc")
    out = root / "run"
    args = ["train", setup["config"], "--data", f"voc:{voc}", "--train-split", "train", "--val-split", "test",
            "--out", str(out), "--epochs", "6", "--steps-per-epoch", "1", "--batch-size", "2",
            "--min-size", "48", "--max-size", "96", "--anchor-sizes", "auto", "--quiet"]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(args)
    assert code == 0, printed.getvalue()
    return {"voc": voc, "out": out, "printed": printed.getvalue(),
            "run": json.loads((out / "run.json").read_text())}


def test_train_takes_class_names_from_the_data_and_saves_them(coin_run):
    assert "classes (1, found in the annotations): coin" in coin_run["printed"]
    assert coin_run["run"]["class_names"] == ["coin"]


def test_size_overrides_reach_the_run_and_the_model(coin_run, setup):
    run = coin_run["run"]
    assert run["input"]["min_size"] == 48 and run["input"]["max_size"] == 96
    assert "image_size" not in run["input"]
    assert "input: shorter side 48, longer side <= 96" in coin_run["printed"]
    model = runs.model_for_inference(setup["config"], weights=str(coin_run["out"] / "model.weights.h5"))
    assert model.input_settings["min_size"] == 48 and model.input_settings["max_size"] == 96
    assert tuple(model.class_names) == ("coin",) and model.num_classes == 1
    assert [list(s) for s in model.anchor_sizes] == run["model_overrides"]["anchor_sizes"]


def test_recipe_adapts_to_batch_size_and_epochs(coin_run):
    recipe = coin_run["run"]["recipe"]
    # No recipe in a JSON config: kerasdet's defaults (lr 0.02 at batch 8, 12 epochs, decay at 8, 11).
    assert recipe["learning_rate"] == pytest.approx(0.02 * 2 / 8)
    assert recipe["decay_epochs"] == [4.0, 5.5]
    assert recipe["warmup_steps"] == 1  # 10 % of 6 steps, rounded up; the recipe says 100
    assert "learning rate 0.005 = 0.02 x 2 / 8" in coin_run["printed"]
    # A zoo entry's 1x recipe (batch 16, 12 epochs, 500 warm-up steps) on 30 images, batch 2, 24 epochs.
    from kerasdet import zoo

    entry = zoo.info("faster_rcnn_r50_fpn")["recipe"]
    adapted = engine.adapt_recipe(entry, steps_per_epoch=15, epochs=24, batch_size=2)
    assert adapted["learning_rate"] == pytest.approx(0.0025)
    assert adapted["decay_epochs"] == [16, 22] and adapted["warmup_steps"] == 36
    explicit = engine.adapt_recipe(entry, 15, batch_size=2, learning_rate=0.01, warmup_steps=400,
                                     decay_epochs=[3])
    assert (explicit["learning_rate"], explicit["warmup_steps"], explicit["decay_epochs"]) == (0.01, 400, [3])
    # The recipe's augmentation reaches the run: flip by default, RefineDet's entries the SSD chain.
    assert recipe["augment"] == "default" and "augmentation flip" in coin_run["printed"]
    ssd = engine.adapt_recipe(zoo.info("refinedet320_vgg16")["recipe"], steps_per_epoch=15)
    assert ssd["augment"] == "ssd" and "augmentation ssd" in engine.format_recipe(ssd)


def test_anchor_fit_table_and_auto_sizes(coin_run):
    from kerasdet.engine import anchor_fit

    printed = coin_run["printed"]
    assert "anchor sizes (auto: log-spaced from the 5% to the 95% quantile" in printed
    assert "anchor fit:" in printed and "no anchor at IoU >= 0.7" in printed
    sizes = coin_run["run"]["model_overrides"]["anchor_sizes"]
    assert len(sizes) == 5 and all(len(level) == 1 for level in sizes)
    flat = [level[0] for level in sizes]
    assert flat == sorted(flat) and 8 <= flat[0] and flat[-1] <= 30  # the boxes are 12..28 px at 64 px
    # A 10x10 box and the FPN default anchors: best is the 32 px square, IoU 100 / 1024.
    fit = anchor_fit.anchor_fit([10, 64], [10, 64], [[32], [64], [128]], [[0.5, 1, 2]] * 3, 0.7)
    assert fit["below_positive"] == 1 and fit["smaller_than_smallest"] == 1
    assert fit["rows"][0]["median_iou"] == pytest.approx(100 / 1024)
    assert "warning: 50.0 % of the training boxes reach no anchor" in anchor_fit.format_anchor_fit(fit)
    # Auto sizes keep the model's sizes per level.
    assert [len(v) for v in anchor_fit.auto_anchor_sizes([10, 20, 40], [10, 20, 40], [3])] == [3]
    with pytest.raises(ValueError, match="has 5 anchor levels, got 2"):
        anchor_fit.parse_anchor_sizes(["16", "32"], 5, [1] * 5)


def test_evaluate_and_predict_use_the_runs_classes_predict_takes_folders_and_globs(coin_run, setup, tmp_path):
    weights = str(coin_run["out"] / "model.weights.h5")
    voc = coin_run["voc"]
    assert cli.main(["evaluate", setup["config"], "--weights", weights, "--data", f"voc:{voc}",
                     "--val-split", "test", "--out", str(tmp_path / "eval")]) == 0
    # predict: a folder and a glob pattern (the same files once each), labels from the run.
    out = tmp_path / "pred"
    assert cli.main(["predict", setup["config"], "--weights", weights, str(voc / "JPEGImages"),
                     str(voc / "JPEGImages" / "00000[0-1].png"), "--out", str(out),
                     "--score-threshold", "0"]) == 0
    records = json.loads((out / "detections.json").read_text())
    assert len(records) == 10 and len({r["image"] for r in records}) == 10
    assert {d["class_name"] for r in records for d in r["detections"]} == {"coin"}
    with pytest.raises(FileNotFoundError, match="matches no file"):
        engine.expand_image_paths([str(voc / "*.jpeg")])


def test_evaluate_and_predict_precision_flag_builds_the_model_in_that_policy_only(coin_run, setup, tmp_path,
                                                                                 monkeypatch):
    built = []
    build = runs.model_for_inference

    def recording(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append((model.compute_dtype, model.backbone.compute_dtype, model.dtype_policy.variable_dtype))
        return model

    monkeypatch.setattr(runs, "model_for_inference", recording)
    weights = str(coin_run["out"] / "model.weights.h5")
    voc = coin_run["voc"]
    # float32 is every other test's path; bfloat16 here.
    out = tmp_path / "bf16"
    assert cli.main(["evaluate", setup["config"], "--weights", weights, "--data", f"voc:{voc}",
                     "--val-split", "test", "--out", str(out / "eval"), "--precision", "mixed_bfloat16"]) == 0
    assert cli.main(["predict", setup["config"], "--weights", weights, str(voc / "JPEGImages" / "00000[0-3].png"),
                     "--out", str(out / "pred"), "--score-threshold", "0", "--precision", "mixed_bfloat16"]) == 0
    assert keras.config.dtype_policy().name == "float32"  # restored after each command
    assert built == [("bfloat16", "bfloat16", "float32")] * 2
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "map" in json.dumps(metrics).lower()
    records = json.loads((out / "pred" / "detections.json").read_text())
    assert len(records) == 4
    for record in records:
        boxes = np.array([d["box_xyxy"] for d in record["detections"]], np.float64)
        assert len(boxes) and np.all(np.isfinite(boxes)) and boxes.min() >= -1e-3 and boxes.max() <= 96 + 1e-3
    with pytest.raises(SystemExit):
        cli.main(["predict", setup["config"], "x.png", "--out", str(tmp_path), "--precision", "float8"])
    assert cli._PRECISIONS == runs.PRECISIONS


def test_a_model_whose_classes_differ_from_the_data_is_an_error(coin_run, setup, tmp_path, capsys):
    other = _coin_voc(tmp_path / "bolts", count=4, seed=5, name="bolt")
    weights = str(coin_run["out"] / "model.weights.h5")
    assert cli.main(["evaluate", setup["config"], "--weights", weights, "--data", f"voc:{other}",
                     "--val-split", "test"]) == 2
    err = capsys.readouterr().err
    assert "the model's classes ['coin']" in err and "['bolt']" in err
    assert cli.main(["train", setup["config"], "--weights", weights, "--data", f"voc:{other}",
                     "--val-split", "test", "--out", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert "['coin']" in err and "['bolt']" in err


def test_classes_and_classes_file_fix_names_and_order(coin_run, setup, tmp_path):
    from kerasdet.data.data_spec import parse_data_spec, read_class_names

    voc = coin_run["voc"]
    given = parse_data_spec(f"voc:{voc}", "train", "test", class_names=read_class_names("washer, coin"))
    assert given.class_names == ["washer", "coin"] and given.class_source == "given"
    assert {int(label) for r in given.train.records for label in r.labels} == {1}
    names_file = tmp_path / "classes.txt"
    names_file.write_text("# one name a line\ncoin\n\nwasher\n")
    assert read_class_names(classes_file=str(names_file)) == ["coin", "washer"]
    with pytest.raises(ValueError, match="repeated class names"):
        read_class_names("a,b,a")
    with pytest.raises(ValueError, match=r"unknown class name 'coin'; the class names are \['bolt'\]"):
        parse_data_spec(f"voc:{voc}", "train", "test", class_names=["bolt"])
    # COCO: the categories may be put in another order, never replaced.
    coco = parse_data_spec(setup["spec"], class_names=["triangle", "circle", "square"])
    default = parse_data_spec(setup["spec"])
    for a, b in zip(coco.val.records, default.val.records):
        assert [coco.class_names[i] for i in a.labels] == [default.class_names[i] for i in b.labels]
    assert coco.val.category_ids == [3, 1, 2]
    with pytest.raises(ValueError, match=r"\['circle', 'square'\] do not match"):
        parse_data_spec(setup["spec"], class_names=["circle", "square"])


def test_training_from_scratch_makes_every_stage_and_norm_trainable(tmp_path):
    from kerasdet.layers import FrozenBatchNormalization

    config = tmp_path / "mbv2.json"
    arguments = {"num_classes": 2, "backbone": "mobilenet_v2", "backbone_config": {"frozen_bn": True, "freeze_at": 2},
                 "fpn_channels": 16, "fc_dim": 32}
    config.write_text(json.dumps({"class": "kerasdet.models.faster_rcnn:FasterRCNN", "arguments": arguments,
                                  "input": {"image_size": [64, 64]}}))
    options = cli._training_options(cli.build_parser().parse_args(["train", str(config), "--data", "x:y",
                                                                   "--out", str(tmp_path)]))
    overrides, note = runs.scratch_overrides(options, runs.pretrained_choice(options))
    assert note == "training from scratch: every stage trainable, BatchNorm trainable (batch statistics)"
    model = engine.resolve_model(str(config), weights=None, **overrides)
    layers = model.backbone.layers
    assert all(layer.trainable for layer in layers)
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and not any(isinstance(layer, FrozenBatchNormalization) for layer in layers)
    # With weights to start from, the entry's fine-tuning settings stay.
    options = cli._training_options(cli.build_parser().parse_args(
        ["train", str(config), "--data", "x:y", "--out", str(tmp_path), "--weights", "w.weights.h5"]))
    assert runs.scratch_overrides(options, None) == ({}, None)


def test_zoo_list_columns_are_aligned_and_status_whole(capsys):
    from kerasdet import zoo

    assert cli.main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0], lines[1:]
    column = header.index("status")
    assert len(rows) == len(zoo.list())
    for name, row in zip(zoo.list(), rows):
        assert row.startswith(name + " ") and row[column:] == zoo.registry.get_entry(name).status()


def _kerasdet_command():
    script = os.path.join(os.path.dirname(sys.executable), "kerasdet")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "kerasdet.cli"]


def test_commands_start_without_tensorflow_logs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "KERASDET_VERBOSE")}
    loud = subprocess.run(_kerasdet_command() + ["zoo", "list", "--verbose"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert loud.returncode == 0, loud.stderr[-2000:]
    if not any(cli._is_tensorflow_log(line) for line in loud.stderr.splitlines()):
        pytest.skip("this TensorFlow build prints no start-up logs")
    quiet = subprocess.run(_kerasdet_command() + ["zoo", "list"], capture_output=True, text=True, timeout=300,
                           env=env)
    assert quiet.returncode == 0 and "faster_rcnn_r50_fpn" in quiet.stdout
    assert quiet.stderr.strip() == "", quiet.stderr
    # kerasdet's own messages pass the filter.
    kept = "kerasdet: compiled kernels not found ...\nI0000 00:00:1796034731.359573    6350 port.cc:153] oneDNN"
    assert [line for line in kept.splitlines() if not cli._is_tensorflow_log(line)] == [kept.splitlines()[0]]


def test_train_precision_flag_sets_the_policy_for_the_run_only(setup, tmp_path, capsys):
    import json

    import keras

    out = tmp_path / "bf16"
    assert cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(out),
                     "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
                     "--precision", "mixed_bfloat16",
                     "--quiet"]) == 0
    assert "precision: mixed_bfloat16" in capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["precision"] == "mixed_bfloat16" and record["strategy"] == "none"
    assert keras.config.dtype_policy().name == "float32"  # restored after the run
    trained = h5_arrays(out / "model.weights.h5")
    assert trained and all(np.all(np.isfinite(v)) for v in trained.values())
    # A mixed_float16 optimizer holds a loss scale: the run resumes only in its own precision.
    assert cli.main(["train", setup["config"], "--data", setup["spec"], "--out", str(out),
                     "--epochs", "2", "--batch-size", "2", "--precision", "mixed_float16",
                     "--resume", "--quiet"]) == 2
    assert "trained with --precision mixed_bfloat16" in capsys.readouterr().err
