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

__all__ = ["WarmupStepSchedule", "adapt_recipe", "format_recipe", "make_optimizer", "make_pipeline",
           "resolve_model", "model_arguments", "from_scratch_backbone_config", "train_model",
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


# A recipe's warm-up (e.g. Detectron's 500 iterations of a 90k-iteration run) is capped at this
# fraction of a run's steps, so that a short run on a small data set is not all warm-up.
MAX_WARMUP_FRACTION = 0.1


def adapt_recipe(recipe, steps_per_epoch, *, epochs=None, batch_size=None, learning_rate=None,
                 weight_decay=None, momentum=None, warmup_steps=None, decay_epochs=None):
    """The effective recipe of a run: a zoo entry's ``recipe`` adapted to the run's flags.

    * Batch size: the recipe's ``batch_size`` is the reference. With another batch the learning
      rate scales linearly, lr x batch / recipe batch (Goyal et al. 2017, the rule Detectron uses),
      unless ``learning_rate`` is given.
    * Epochs: decay epochs of the recipe scale with ``epochs`` / recipe epochs (recipe 12 epochs with
      decay at [8, 11] -> 24 epochs decay at [16, 22]) unless ``decay_epochs`` is given.
    * Warm-up: the recipe's steps, at most MAX_WARMUP_FRACTION of the run's steps, unless
      ``warmup_steps`` is given.

    Returns a TrainingRecipe whose extra keys record the reference values and ``changes`` (what was
    adapted and why, one line each), for the printout and run.json.
    """
    base = TrainingRecipe(recipe)
    out = TrainingRecipe(recipe, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                         weight_decay=weight_decay, momentum=momentum, warmup_steps=warmup_steps,
                         decay_epochs=decay_epochs)
    changes = []
    if learning_rate is None and out["batch_size"] != base["batch_size"]:
        out["learning_rate"] = base["learning_rate"] * out["batch_size"] / base["batch_size"]
        changes.append(f"learning rate {out['learning_rate']:.6g} = {base['learning_rate']:g} x "
                       f"{out['batch_size']} / {base['batch_size']} (linear scaling from the recipe's batch)")
    if decay_epochs is None and out["epochs"] != base["epochs"]:
        factor = out["epochs"] / base["epochs"]
        out["decay_epochs"] = [round(e * factor, 4) for e in base["decay_epochs"]]
        changes.append(f"decay epochs {_numbers(out['decay_epochs'])} = recipe's {_numbers(base['decay_epochs'])}"
                       f" x {out['epochs']} / {base['epochs']} epochs")
    total_steps = int(out["epochs"]) * int(steps_per_epoch)
    cap = max(1, math.ceil(MAX_WARMUP_FRACTION * total_steps))
    if warmup_steps is None and out["warmup_steps"] > cap:
        changes.append(f"warm-up {cap} steps (recipe's {out['warmup_steps']}, capped at "
                       f"{MAX_WARMUP_FRACTION:.0%} of the run's {total_steps} steps)")
        out["warmup_steps"] = cap
    out.update(recipe_batch_size=base["batch_size"], recipe_learning_rate=base["learning_rate"],
               recipe_epochs=base["epochs"], steps_per_epoch=int(steps_per_epoch), total_steps=total_steps,
               changes=changes)
    return out


def _numbers(values):
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def format_recipe(recipe):
    """A few lines describing the effective recipe (as `kerasdet train` prints it)."""
    lines = [f"recipe: batch {recipe['batch_size']}, learning rate {recipe['learning_rate']:.6g}, "
             f"{recipe['epochs']} epochs x {recipe.get('steps_per_epoch', '?')} steps, warm-up "
             f"{recipe['warmup_steps']} steps, x{recipe['decay_factor']:g} at epochs "
             f"{_numbers(recipe['decay_epochs'])}, SGD momentum {recipe['momentum']:g}, "
             f"weight decay {recipe['weight_decay']:g}"]
    lines += [f"  adapted: {change}" for change in recipe.get("changes", ())]
    return "\n".join(lines)


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


def _read_json_config(spec):
    with open(spec, encoding="utf-8") as handle:
        return json.load(handle)


def model_arguments(spec):
    """The constructor arguments a zoo entry name or JSON config builds with (None for a .keras file)."""
    if isinstance(spec, keras.Model) or os.fspath(spec).endswith(".keras"):
        return None
    if os.fspath(spec).endswith(".json"):
        return dict(_read_json_config(spec)["arguments"])
    from kerasdet.zoo import registry

    return dict(registry.get_entry(spec).arguments)


def from_scratch_backbone_config(backbone, backbone_config=None):
    """The backbone settings for training a randomly initialised backbone: no frozen stage and
    trainable normalization. Freezing early stages and BatchNorm statistics is how pretrained
    ImageNet weights are fine-tuned; on random weights it leaves random layers and an identity
    "normalization" that never learn. Returns (config, description of what changed)."""
    config = dict(backbone_config or {})
    if backbone.startswith(("resnet", "mobilenet")):
        config.update(frozen_bn=False, freeze_at=0)
        return config, "every stage trainable, BatchNorm trainable (batch statistics)"
    if backbone.startswith("vgg"):
        config.update(freeze_blocks=0)
        return config, "every block trainable (VGG-16 has no normalization layers)"
    return config, "every layer trainable (this backbone has no frozen stages or normalization)"


def resolve_model(spec, weights="default", num_classes=None, pretrained_backbone=None, **overrides):
    """A model from a zoo entry name, a .keras file or a JSON config {"class", "arguments", "input"}.

    ``pretrained_backbone`` applies to zoo entries (see `kerasdet.zoo.load`); ``overrides`` are
    constructor arguments replacing the entry's or config's (e.g. anchor_sizes, backbone_config)."""
    from kerasdet import zoo

    if isinstance(spec, keras.Model):
        return spec
    spec = os.fspath(spec)
    if spec.endswith(".keras"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model file {spec!r} does not exist")
        if overrides:
            raise ValueError(f"{spec}: a .keras model is already built; {sorted(overrides)} cannot change")
        _register_model_classes()
        return keras.saving.load_model(spec)
    if spec.endswith(".json"):
        import importlib

        config = _read_json_config(spec)
        module_name, _, class_name = config["class"].partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        arguments = dict(config["arguments"])
        arguments.update(overrides)
        if num_classes is not None:
            arguments["num_classes"] = num_classes
        model = cls(**arguments)
        settings = config.get("input") or None
        model.kerasdet_input = dict(settings) if settings else None
        size = (settings or {}).get("image_size") or (64, 64)
        model.build((1, *size, 3))
        if weights not in (None, "default"):
            zoo.load_verified_weights(model, weights)
        return model
    return zoo.load(spec, weights=weights, num_classes=num_classes, pretrained_backbone=pretrained_backbone,
                    **overrides)


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
