"""The training / evaluation / prediction runs behind `kerasdet train|evaluate|predict` and train/*.py.

A run writes into its output folder OUT:
    OUT/checkpoints/epoch_NNN.weights.h5, last_good.weights.h5   one per finished epoch
    OUT/backup/                          keras.callbacks.BackupAndRestore state (for --resume)
    OUT/logs/                            TensorBoard event files
    OUT/model.weights.h5, OUT/run.json   final weights and how they were made
    OUT/metrics.json                     voc_map50, coco_ap (+ the full results)
"""
import json
import math
import os
import shutil
import sys

import keras
import numpy as np
import tensorflow as tf

__all__ = ["WarmupStepSchedule", "make_optimizer", "make_pipeline", "resolve_model", "train_model",
           "evaluate_detector", "predict_images", "StopOnNaN", "TrainingRecipe"]


@keras.saving.register_keras_serializable(package="kerasdet")
class WarmupStepSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from ``warmup_factor * lr`` to ``lr`` over ``warmup_steps``, then ``lr``
    multiplied by ``decay_factor`` at each step in ``decay_steps`` (the papers' step schedule).

    Keras has PiecewiseConstantDecay and a warm-up only inside CosineDecay, hence this small schedule.
    """

    def __init__(self, learning_rate, decay_steps=(), decay_factor=0.1, warmup_steps=0,
                 warmup_factor=0.001):
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.learning_rate = float(learning_rate)
        self.decay_steps = tuple(int(s) for s in decay_steps)
        if list(self.decay_steps) != sorted(self.decay_steps):
            raise ValueError(f"decay_steps must be increasing, got {decay_steps}")
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        boundaries = tf.constant(self.decay_steps or (np.inf,), tf.float32)
        passed = tf.reduce_sum(tf.cast(step >= boundaries, tf.float32))
        rate = self.learning_rate * tf.pow(self.decay_factor, passed)
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / float(self.warmup_steps), 1.0)
            rate = rate * (self.warmup_factor + (1.0 - self.warmup_factor) * alpha)
        return rate

    def get_config(self):
        return {"learning_rate": self.learning_rate, "decay_steps": list(self.decay_steps),
                "decay_factor": self.decay_factor, "warmup_steps": self.warmup_steps,
                "warmup_factor": self.warmup_factor}


class TrainingRecipe(dict):
    """A zoo entry's recipe with the drivers' defaults filled in."""

    DEFAULTS = {"learning_rate": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8,
                "epochs": 12, "decay_epochs": [8, 11], "decay_factor": 0.1, "warmup_steps": 100,
                "warmup_factor": 0.001, "clipnorm": 10.0}

    def __init__(self, recipe=None, **overrides):
        super().__init__(self.DEFAULTS)
        self.update({k: v for k, v in (recipe or {}).items() if k in self.DEFAULTS})
        self.update({k: v for k, v in overrides.items() if v is not None})


def make_optimizer(recipe, steps_per_epoch):
    """SGD with momentum, decoupled weight decay, warm-up and step decay (epochs -> steps)."""
    schedule = WarmupStepSchedule(
        recipe["learning_rate"], [int(e * steps_per_epoch) for e in recipe["decay_epochs"]],
        recipe["decay_factor"], recipe["warmup_steps"], recipe["warmup_factor"])
    return keras.optimizers.SGD(schedule, momentum=recipe["momentum"],
                                weight_decay=recipe["weight_decay"],
                                clipnorm=recipe["clipnorm"] or None)


def make_pipeline(dataset, input_settings, batch_size, training, seed=0, with_masks=False):
    """The tf.data pipeline of a data set at a model's input settings (its ResizeRule)."""
    from kerasdet.data.pipeline import build_dataset

    return build_dataset(dataset, batch_size, training=training, input_settings=input_settings,
                         seed=seed, with_masks=with_masks)


def _register_model_classes():
    """Imports every detector module that exists, so that their Keras-serializable classes are
    registered before a .keras file naming them is read (kerasdet.models imports none itself)."""
    import importlib

    from kerasdet.zoo.registry import entries

    for module_name in sorted({e.class_path.partition(":")[0] for e in entries().values()}):
        try:
            importlib.import_module(module_name)
        except ImportError:
            pass  # an entry whose model is not written yet


def resolve_model(spec, weights="default", num_classes=None, pretrained_backbone=None):
    """A model from a zoo entry name, a .keras file or a JSON config {"class", "arguments", "input"}.

    ``pretrained_backbone`` applies to zoo entries (see `kerasdet.zoo.load`)."""
    from kerasdet import zoo

    if isinstance(spec, keras.Model):
        return spec
    spec = os.fspath(spec)
    if spec.endswith(".keras"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        _register_model_classes()
        return keras.saving.load_model(spec)
    if spec.endswith(".json"):
        import importlib

        with open(spec, encoding="utf-8") as handle:
            config = json.load(handle)
        module_name, _, class_name = config["class"].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        arguments = dict(config["arguments"])
        if num_classes is not None:
            arguments["num_classes"] = num_classes
        model = cls(**arguments)
        model.kerasdet_input = dict(config.get("input") or {})
        size = model.kerasdet_input.get("image_size") or (64, 64)
        model.build((1, *size, 3))
        if weights not in (None, "default"):
            zoo.load_verified_weights(model, weights)
        return model
    return zoo.load(spec, weights=weights, num_classes=num_classes, pretrained_backbone=pretrained_backbone)


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
    """BackupAndRestore that does not back up the state of an epoch that hit a NaN loss."""

    def __init__(self, backup_dir, guard):
        super().__init__(backup_dir)
        self.guard = guard

    def on_epoch_end(self, epoch, logs=None):
        if not self.guard.stopped:
            super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if not self.guard.stopped:  # keep the last good state for --resume
            super().on_train_end(logs)


def _tensorboard(log_dir):
    """[TensorBoard callback], or [] with a warning when the tensorboard package is missing
    (tf.summary needs it; OUT/history.csv holds the same scalars)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        print("kerasdet: the tensorboard package is not installed; no TensorBoard logs "
              "(pip install tensorboard). Per-epoch losses go to history.csv.", file=sys.stderr)
        return []
    return [keras.callbacks.TensorBoard(log_dir, update_freq="epoch")]


def train_model(model, train_ds, out_dir, recipe, steps_per_epoch=None, val_ds=None, resume=False,
                callbacks=(), verbose=1):
    """Compiles ``model`` with the recipe's optimizer and fits it with checkpoints, TensorBoard
    logs, BackupAndRestore and the NaN guard. Returns {"history", "stopped_on_nan", "message"}."""
    os.makedirs(out_dir, exist_ok=True)
    if steps_per_epoch is None:
        steps_per_epoch = int(train_ds.cardinality().numpy())
        if steps_per_epoch < 1:
            raise ValueError("the training dataset has unknown or zero length; pass steps_per_epoch")
    backup_dir = os.path.join(out_dir, "backup")
    if not resume and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    if resume and not os.path.isdir(backup_dir):
        print(f"--resume: no backup in {backup_dir}; starting from epoch 1", file=sys.stderr)
    checkpoints = os.path.join(out_dir, "checkpoints")
    guard = StopOnNaN(os.path.join(checkpoints, "last_good.weights.h5"))
    model.compile(optimizer=make_optimizer(recipe, steps_per_epoch))
    model.build()
    all_callbacks = [guard, EpochCheckpoint(checkpoints, guard),
                     GuardedBackupAndRestore(backup_dir, guard),
                     keras.callbacks.CSVLogger(os.path.join(out_dir, "history.csv"), append=resume),
                     *_tensorboard(os.path.join(out_dir, "logs")), *callbacks]
    history = model.fit(train_ds, epochs=int(recipe["epochs"]), steps_per_epoch=steps_per_epoch,
                        validation_data=val_ds, callbacks=all_callbacks, verbose=verbose)
    if not guard.stopped:
        model.save_weights(os.path.join(out_dir, "model.weights.h5"))
    return {"history": history.history, "stopped_on_nan": guard.stopped, "message": guard.message}


def metrics_summary(results):
    """{"voc_map50", "coco_ap", "coco_ap50", "coco_ap75", "num_images"} from evaluate_model output."""
    summary = {"num_images": results.get("num_images")}
    if "voc" in results:
        summary["voc_map50"] = float(results["voc"]["mAP"])
    if "coco" in results:
        bbox = results["coco"]["bbox"]
        summary.update(coco_ap=float(bbox["AP"]), coco_ap50=float(bbox["AP50"]),
                       coco_ap75=float(bbox["AP75"]))
        if "segm" in results["coco"]:
            summary["coco_mask_ap"] = float(results["coco"]["segm"]["AP"])
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def evaluate_detector(model, val_ds, class_names=None, out_dir=None, with_masks=False, quiet=False,
                      records=None, split="val"):
    """VOC mAP@0.5 and COCO AP on a dataset, scored in the original images' pixels; prints the
    table, writes OUT/metrics.json and OUT/detections_<split>.json (COCO results format).

    ``records``: the DetectionDataset ``val_ds`` was built from; its ground truth (and, for COCO, its
    annotation file) is what the detections are scored against.
    """
    from kerasdet.evaluation import evaluate_model, format_metrics_table

    detections_file = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        detections_file = os.path.join(out_dir, f"detections_{split}.json")
    results = evaluate_model(model, val_ds, metrics=("voc", "coco"), class_names=class_names,
                             records=records, detections_file=detections_file)
    summary = metrics_summary(results)
    if not quiet:
        print(format_metrics_table(results, class_names))
        print(f"VOC mAP@0.5 {summary['voc_map50']:.4f}   COCO AP {summary['coco_ap']:.4f}")
    if out_dir:
        with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(_jsonable({**summary, "results": results}), handle, indent=2, sort_keys=True)
    return summary


def predict_images(model, image_paths, out_dir, class_names=None, score_threshold=0.3,
                   input_settings=None):
    """Runs the detector on image files; writes OUT/<stem>.png with the boxes drawn and
    OUT/detections.json (boxes in the original image's pixels). Returns the JSON records."""
    from kerasdet.data.images import read_image
    from kerasdet.visualize import draw_detections, save_png

    from kerasdet.data.resize import ResizeRule, boxes_to_original

    settings = input_settings or getattr(model, "input_settings", None)
    if not settings:
        raise ValueError("the model carries no input settings (it was not made by kerasdet.zoo.load or "
                         "a kerasdet run): pass input_settings={'min_size': ..., 'max_size': ...}")
    rule = ResizeRule.from_settings(settings)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for path in image_paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {path!r} does not exist")
        image = read_image(path)
        canvas, info = rule.prepare(tf.constant(image))
        out = model.predict_on_batch({"images": canvas[None], "image_info": info[None]})
        n = int(np.asarray(out["num_detections"])[0])
        boxes = boxes_to_original(np.asarray(out["boxes"])[0, :n], info.numpy())
        scores = np.asarray(out["scores"])[0, :n]
        classes = np.asarray(out["classes"])[0, :n]
        keep = scores >= score_threshold
        picture = draw_detections(image, boxes[keep], classes[keep], scores[keep],
                                  class_names=class_names)
        stem = os.path.splitext(os.path.basename(path))[0]
        png = os.path.join(out_dir, f"{stem}.png")
        save_png(picture, png)
        records.append({"image": path, "output": png, "detections": [
            {"box_xyxy": [float(v) for v in boxes[i]], "score": float(scores[i]),
             "class_id": int(classes[i]),
             "class_name": class_names[int(classes[i])] if class_names else None}
            for i in np.flatnonzero(keep)]})
    with open(os.path.join(out_dir, "detections.json"), "w", encoding="utf-8") as handle:
        json.dump(records, handle, indent=2)
    return records
