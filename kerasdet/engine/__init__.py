"""kerasdet.engine: training and the runs built on it -- what `kerasdet train | evaluate | predict |
export`, train/*.py and the demo call.

    from kerasdet import engine
    recipe = engine.TrainingRecipe(zoo_entry_recipe, epochs=6)
    run = engine.train_model(model, engine.make_pipeline(train_set, model.input_settings, 8, True),
                             "runs/x", recipe)
    engine.evaluate_detector(model, engine.make_pipeline(val_set, model.input_settings, 8, False))
    engine.runs.train(engine.TrainingOptions(model="faster_rcnn_r50_fpn", data="voc:VOC2007", out="runs/y"))

Module map: recipe (TrainingRecipe, adapt_recipe, WarmupStepSchedule, make_optimizer), callbacks (NaN
guard, checkpoints of good epochs, resume state), loop (make_pipeline, train_model), inference
(evaluate_detector, predict_images), model_spec (what a MODEL argument names: resolve_model, input
settings, from-scratch backbone settings), anchor_fit (anchors against a data set's boxes), alternating
(Faster R-CNN's 4-step alternating training), runs (the command-line runs and their run.json).
"""
from kerasdet.engine import runs
from kerasdet.engine.callbacks import EpochCheckpoint, GuardedBackupAndRestore, StopOnNaN
from kerasdet.engine.inference import evaluate_detector, expand_image_paths, metrics_summary, predict_images
from kerasdet.engine.loop import make_pipeline, train_model
from kerasdet.engine.model_spec import from_scratch_backbone_config, model_arguments, resolve_model
from kerasdet.engine.recipe import TrainingRecipe, WarmupStepSchedule, adapt_recipe, format_recipe, make_optimizer
from kerasdet.engine.runs import TrainingOptions, model_for_inference

__all__ = ["runs", "EpochCheckpoint", "GuardedBackupAndRestore", "StopOnNaN", "evaluate_detector",
           "expand_image_paths", "metrics_summary", "predict_images", "make_pipeline", "train_model",
           "from_scratch_backbone_config", "model_arguments", "resolve_model", "TrainingRecipe",
           "WarmupStepSchedule", "adapt_recipe", "format_recipe", "make_optimizer", "TrainingOptions",
           "model_for_inference"]
