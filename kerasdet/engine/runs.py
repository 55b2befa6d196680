"""The runs behind `kerasdet train | evaluate | predict | export` (and train/*.py): data and model
from their names, the run record that later runs read back, and the lines printed on the way.

A training run writes into OUT what `loop.train_model` writes (checkpoints/, logs/, history.csv,
model.weights.h5), the scores of `inference.evaluate_detector` (metrics.json,
detections_<split>.json) and OUT/run.json: the model, data, effective recipe, input settings, class
names, constructor overrides (anchor sizes, from-scratch backbone settings) and anchor fit. Evaluate,
predict and export given weights from OUT (or OUT/checkpoints/) rebuild the model that run trained:
its classes, input settings and overrides come from run.json.
"""
import contextlib
import dataclasses
import json
import os
import sys

from kerasdet.data.data_spec import align_classes, parse_data_spec, read_class_names
from kerasdet.engine import anchor_fit
from kerasdet.engine.alternating import train_alternating
from kerasdet.engine.distribute import distributed_pipeline, make_strategy, worker_role
from kerasdet.engine.inference import evaluate_detector, expand_image_paths, predict_images
from kerasdet.engine.callbacks import DEFAULT_BACKUP_STEPS
from kerasdet.engine.loop import check_output_folder, make_pipeline, named_input_error, train_model
from kerasdet.engine.model_spec import (DEFAULT_INPUT, class_names_of, describe_input, entry_recipe,
                                       from_scratch_backbone_config, give_data_to, input_settings_for,
                                       is_zoo_name, model_arguments, resolve_model)
from kerasdet.engine.recipe import TrainingRecipe, adapt_recipe, format_recipe

__all__ = ["RUN_RECORD", "TrainingOptions", "train", "evaluate", "predict", "export", "run_record_of",
           "model_for_inference", "pretrained_choice", "scratch_overrides", "proposal_files",
           "takes_proposals"]

RUN_RECORD = "run.json"


@dataclasses.dataclass
class TrainingOptions:
    """What a training run is asked for, named as `kerasdet train`'s flags; None takes the recipe's,
    the entry's or the data's value."""
    model: str                       # zoo entry name, JSON config or .keras file
    data: str                        # voc:ROOT | coco:ANN.json:IMAGE_DIR | synthetic:DIR
    out: str                         # the run folder
    train_split: str = "train"
    val_split: str = "val"
    weights: str = None              # None: random (or the entry's pretrained backbone); a .weights.h5
    num_classes: int = None          # must agree with the data's classes when given
    classes: str = None              # "a,b,c": the class names in label order
    classes_file: str = None         # or a file of them, one a line
    batch_size: int = None
    epochs: int = None
    steps_per_epoch: int = None
    learning_rate: float = None
    weight_decay: float = None
    momentum: float = None
    warmup_steps: int = None
    decay_epochs: list = None
    resume: bool = False
    no_pretrained: bool = False      # a random backbone even where the entry names a pretrained one
    min_size: list = None            # one or several shorter-side sizes
    max_size: int = None
    image_size: list = None          # [H, W], instead of min_size / max_size
    anchor_sizes: list = None        # ["auto"] or one token per level ("16", "32,64")
    alternating: bool = False        # the Faster R-CNN paper's 4-step training (engine.alternating)
    seed: int = 0
    quiet: bool = False              # no progress bars
    strategy: str = "none"           # none | mirrored | multi-worker (engine.distribute)
    precision: str = None            # None / float32 | mixed_float16 | mixed_bfloat16
    jit_compile: object = "auto"     # Keras' jit_compile: "auto" (models.base.Detector.compile), True, False
    proposals: str = None            # proposal cache file, "{split}" replaced by the split name
    max_proposals: int = 2000        # proposals per image the pipeline keeps
    on_bad: str = "error"            # bad records: "error" lists them all and stops, "skip" drops them
    max_image_pixels: int = None     # decompression-bomb limit (None: KERASDET_MAX_IMAGE_PIXELS or 1e8)
    backup_steps: int = DEFAULT_BACKUP_STEPS  # resume state every N steps too (0: every epoch only)
    exact_resume: bool = False       # --resume replays the data stream to the saved step (see loop)


def _say(line):
    print(line, flush=True)


def run_record_of(weights):
    """run.json of the training run that wrote the weights file ``weights`` (in the run folder or its
    checkpoints/), or None."""
    if not weights or weights == "default":
        return None
    folder = os.path.dirname(os.path.abspath(weights))
    candidates = [os.path.join(folder, RUN_RECORD)]
    if os.path.basename(folder) == "checkpoints":
        candidates.append(os.path.join(os.path.dirname(folder), RUN_RECORD))
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
    return None


def model_for_inference(model_spec, weights="default", num_classes=None):
    """The model of evaluate / predict / export: the architecture, classes and input settings a
    training run recorded in run.json next to ``weights``, when there is one."""
    run = run_record_of(weights) or {}
    overrides = dict(run.get("model_overrides") or {})
    names = run.get("class_names")
    num_classes = num_classes or (len(names) if names else None)
    model = resolve_model(model_spec, weights=weights, num_classes=num_classes, **overrides)
    give_data_to(model, names, run.get("input"))
    return model


def takes_proposals(model):
    """Whether a detector reads external proposals from its input (Fast R-CNN)."""
    return "proposals" in tuple(getattr(model, "predict_input_keys", None) or ())


def proposal_files(pattern, model, splits, where):
    """{split: cache file or None} of a --proposals pattern ("{split}" replaced), checked against
    the model: a detector on external proposals needs them, any other must not get them."""
    name = getattr(model, "name", type(model).__name__)
    if pattern is None:
        if takes_proposals(model):
            raise ValueError(f"{where}: {name} works on external region proposals: give --proposals FILE "
                             "(write it first with `kerasdet proposals --data ... --out proposals.npz`, "
                             "then --proposals proposals_{split}.npz)")
        return {split: None for split in splits}
    if not takes_proposals(model):
        raise ValueError(f"{where}: --proposals {pattern} given, but {name} does not take external "
                         "proposals (it makes its own or needs none)")
    return {split: pattern.replace("{split}", split) for split in splits}


def _check_model_classes(model, data, where):
    """Aligns the data's labels to the model's classes; a model whose classes differ from the data's
    is an error naming both lists."""
    names = getattr(model, "class_names", None)
    if names:
        return align_classes(data, list(names), where, "the model's classes")
    if model.num_classes != len(data.class_names):
        raise ValueError(f"{where}: the model has {model.num_classes} classes but the data set has "
                         f"{len(data.class_names)}: {data.class_names}")
    return data


def pretrained_choice(options):
    """no_pretrained -> False; a zoo entry naming a pretrained backbone, trained without weights ->
    True (required); anything else -> None (nothing to load)."""
    if options.no_pretrained:
        return False
    if options.weights is None and is_zoo_name(options.model):
        from kerasdet import zoo

        if zoo.registry.get_entry(options.model).pretrained_backbone:
            return True
    return None


def scratch_overrides(options, pretrained):
    """Constructor overrides for a backbone that starts from random weights, with the sentence that
    says so; ({}, None) when the backbone starts from trained weights or cannot be rebuilt."""
    starts_random = options.weights is None and pretrained is not True
    arguments = model_arguments(options.model) if starts_random else None
    if not arguments or "backbone" not in arguments:
        return {}, None
    config, how = from_scratch_backbone_config(arguments["backbone"], arguments.get("backbone_config"))
    changed = {"backbone_config": config} if config != dict(arguments.get("backbone_config") or {}) else {}
    return changed, f"training from scratch: {how}"


def _anchor_overrides(options, data, settings, build_probe):
    """{"anchor_sizes": ...} for ``options.anchor_sizes`` (explicit, or auto from the training boxes),
    with a line to print; ({}, None) without them."""
    if not options.anchor_sizes:
        return {}, None
    layout = anchor_fit.anchor_layout(build_probe())
    if layout is None:
        raise ValueError(f"--anchor-sizes: {options.model} has no anchors")
    counts = [len(level) for level in layout[0]]
    if list(options.anchor_sizes) == ["auto"]:
        widths, heights = anchor_fit.training_box_sizes(data.train, settings)
        sizes = anchor_fit.auto_anchor_sizes(widths, heights, counts)
        lo, hi = (f"{q:.0%}" for q in anchor_fit.AUTO_QUANTILES)
        line = (f"anchor sizes (auto: log-spaced from the {lo} to the {hi} quantile of the training boxes' "
                f"sqrt(w*h)): {sizes} (the entry's: {layout[0]})")
    else:
        sizes = anchor_fit.parse_anchor_sizes(options.anchor_sizes, len(counts), counts)
        line = f"anchor sizes: {sizes} (the entry's: {layout[0]})"
    return {"anchor_sizes": sizes}, line


def _anchor_fit_of(model, data, settings, anchors_fitted=False):
    """The fit of the model's anchors to the training boxes (printed), or None without anchors."""
    layout = anchor_fit.anchor_layout(model)
    if layout is None or data.train is None:
        return None
    widths, heights = anchor_fit.training_box_sizes(data.train, settings)
    fit = anchor_fit.anchor_fit(widths, heights, *layout)
    _say(anchor_fit.format_anchor_fit(fit, anchors_fitted))
    return fit


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def checked_precision(precision, where):
    """``precision`` (None: "float32") if it is one of PRECISIONS; otherwise a ValueError naming
    ``where`` and the choices."""
    precision = precision or "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


@contextlib.contextmanager
def dtype_policy(precision, where):
    """Keras' global dtype policy set to ``precision`` (None: float32) for the block, restored after
    it: models built inside compute in that dtype and keep float32 variables."""
    import keras

    precision = checked_precision(precision, where)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield precision
    finally:
        keras.config.set_dtype_policy(previous)


def _write_run_record(options, recipe, backbone_weights, scratch_note, overrides, settings, data, fit,
                      strategy, precision):
    os.makedirs(options.out, exist_ok=True)
    with open(os.path.join(options.out, RUN_RECORD), "w", encoding="utf-8") as handle:
        json.dump({"argv": sys.argv, "model": options.model, "data": options.data, "recipe": dict(recipe),
                   "weights": options.weights, "backbone_weights": backbone_weights,
                   "training_from_scratch": scratch_note, "model_overrides": overrides,
                   "input": settings, "class_names": list(data.class_names),
                   "class_source": data.class_source, "anchor_fit": fit,
                   "alternating": options.alternating, "strategy": options.strategy or "none",
                   "replicas": strategy.num_replicas_in_sync if strategy is not None else 1,
                   "precision": precision, "proposals": options.proposals}, handle, indent=2)


def train(options):
    """Trains ``options.model`` on ``options.data`` into ``options.out``, then evaluates it on the
    validation split. Prints what the run starts from (classes, input, backbone, anchors, recipe).
    Returns {"stopped_on_nan", "message", "metrics"} (metrics None after a NaN stop, and on the
    workers of a multi-worker run other than the chief, which evaluates).

    ``options.precision`` sets Keras' global dtype policy for the run (restored afterwards)."""
    precision = checked_precision(options.precision, "kerasdet train")
    if options.strategy not in (None, "none") and options.alternating:
        raise ValueError("--alternating trains four networks one after the other and does not run "
                         "under --strategy; train it on one device")
    record = os.path.join(options.out, RUN_RECORD)
    if options.resume and os.path.isfile(record):
        with open(record, encoding="utf-8") as handle:
            trained_with = json.load(handle).get("precision", "float32")
        if trained_with != precision:
            # A float16 run's optimizer state holds the loss scale: the backup does not load
            # into another precision's optimizer.
            raise ValueError(f"--resume: the run in {options.out} trained with --precision {trained_with}; "
                             f"resume it with the same precision, not {precision}")
    from kerasdet.data import images

    check_output_folder(options.out)  # before minutes of data loading: --out must be writable
    previous_limit = images._max_pixels_override
    if options.max_image_pixels is not None:
        images.set_max_image_pixels(options.max_image_pixels)
    try:
        with dtype_policy(precision, "kerasdet train"):
            return _train(options, precision)
    finally:
        images.set_max_image_pixels(previous_limit)


def _say_skipped(data, say, when):
    """The counted list of what the readers (or the pipeline) skipped, dropped or fixed."""
    for dataset in {id(d): d for d in (data.train, data.val) if d is not None}.values():
        text = dataset.report.describe()
        if text:
            say(f"{when}:\n{text}")


def _exact_resume(options, strategy, repeat):
    """Whether --exact-resume can replay the stream: one device and a repeated stream (with
    --steps-per-epoch), where batch k of the run is batch k of the pipeline."""
    if not options.exact_resume:
        return False
    if strategy is not None or not repeat:
        raise ValueError("--exact-resume needs --steps-per-epoch (a repeated data stream) and no "
                         "--strategy")
    return True


def _named(run, *args, **kwargs):
    """``run(*args, **kwargs)`` with a TensorFlow error of the input pipeline replaced by the
    BadInputError that names the file and record."""
    import tensorflow as tf

    try:
        return run(*args, **kwargs)
    except tf.errors.OpError as error:
        named = named_input_error(error)
        if named is None:
            raise
        raise named from error


def _train(options, precision):
    import keras

    strategy = make_strategy(options.strategy)
    role = worker_role(strategy)
    say = _say if role.is_chief else (lambda line: None)
    if strategy is not None:
        _say(f"strategy: {options.strategy}, {strategy.num_replicas_in_sync} replicas; "
             f"this process is {role.describe()}")
    if precision != "float32":
        say(f"precision: {precision} (variables, losses and boxes float32"
            + ("; dynamic loss scaling)" if precision == "mixed_float16" else ")"))
    keras.utils.set_random_seed(options.seed)
    data = parse_data_spec(options.data, options.train_split, options.val_split,
                           class_names=read_class_names(options.classes, options.classes_file),
                           on_bad=options.on_bad)
    _say_skipped(data, say, "bad input skipped or fixed while reading (--on-bad "
                 f"{options.on_bad})")
    say(f"classes ({len(data.class_names)}, {data.class_source}): {', '.join(data.class_names)}")
    previous = run_record_of(options.weights)
    if previous and previous.get("class_names"):
        align_classes(data, previous["class_names"], f"--weights {options.weights}",
                      "the classes these weights were trained on")
    if options.num_classes is not None and options.num_classes != len(data.class_names):
        raise ValueError(f"--num-classes {options.num_classes}, but the data set has {len(data.class_names)} "
                         f"classes: {data.class_names}")
    settings = input_settings_for(options.model, options.min_size, options.max_size, options.image_size)
    say(f"input: {describe_input(settings)}")
    pretrained = pretrained_choice(options)
    overrides, scratch_note = scratch_overrides(options, pretrained)

    num_classes = len(data.class_names)
    # The entry's anchor layout comes from a model built without weights (only with anchor_sizes).
    anchors, anchor_note = _anchor_overrides(
        options, data, settings,
        lambda: resolve_model(options.model, weights=None, num_classes=num_classes, **overrides))
    overrides.update(anchors)

    def make_model():
        built = resolve_model(options.model, weights=options.weights, num_classes=num_classes,
                              pretrained_backbone=pretrained, **overrides)
        give_data_to(built, data.class_names, settings)
        return built

    if strategy is None:
        model = make_model()
    else:
        with strategy.scope():  # its weights are mirrored over the replicas
            model = make_model()
    backbone_weights = getattr(model, "kerasdet_backbone_weights", None)
    if options.weights is None:
        if backbone_weights:
            from kerasdet.zoo.pretrained import start_message

            say(start_message(backbone_weights))
        else:
            say("backbone: random initialization" + (" (--no-pretrained)" if options.no_pretrained else ""))
    for note in (scratch_note, anchor_note):
        if note:
            say(note)
    fit = _anchor_fit_of(model, data, settings,
                         anchors_fitted=list(options.anchor_sizes or []) == ["auto"])

    recipe_source = entry_recipe(options.model)
    batch_size = options.batch_size or TrainingRecipe(recipe_source)["batch_size"]
    steps_per_epoch = options.steps_per_epoch
    if role.num_workers > 1 and steps_per_epoch is None:
        # The workers' shards may differ by a batch, and a worker that runs out first would leave
        # the others waiting in an all-reduce: every worker takes the same number of steps of a
        # repeated pipeline instead.
        steps_per_epoch = len(data.train.records) // batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{len(data.train.records)} training images make no global batch of "
                             f"{batch_size}")
    if options.on_bad == "skip" and steps_per_epoch is None:
        # Records skipped in the pipeline make its length unknown: epochs of a repeated stream
        # instead, as long as the data set's pass.
        steps_per_epoch = -(-len(data.train.records) // batch_size)
    repeat = steps_per_epoch is not None

    augment = TrainingRecipe(recipe_source)["augment"]
    caches = proposal_files(options.proposals, model, (options.train_split, options.val_split),
                            f"kerasdet train {options.model}")
    if caches[options.train_split]:
        say(f"proposals: {caches[options.train_split]} (train), {caches[options.val_split]} (val), "
            f"at most {options.max_proposals} per image")

    def pipeline(size, shard):
        built = make_pipeline(data.train, settings, size, True, seed=options.seed, shard=shard,
                              augment=augment, proposals=caches[options.train_split],
                              max_proposals=options.max_proposals, on_bad=options.on_bad)
        return built.repeat() if repeat else built

    train_ds = distributed_pipeline(strategy, pipeline, batch_size)
    val_ds = make_pipeline(data.val, settings, batch_size, False, proposals=caches[options.val_split],
                           max_proposals=options.max_proposals, on_bad=options.on_bad)
    steps = steps_per_epoch or int(train_ds.cardinality().numpy())
    recipe = adapt_recipe(
        recipe_source, steps, epochs=options.epochs, batch_size=options.batch_size,
        learning_rate=options.learning_rate, weight_decay=options.weight_decay, momentum=options.momentum,
        warmup_steps=options.warmup_steps, decay_epochs=options.decay_epochs)
    say(format_recipe(recipe))
    if role.is_chief:
        _write_run_record(options, recipe, backbone_weights, scratch_note, overrides, settings, data,
                          fit, strategy, precision)
    if options.alternating:
        # Step 1's separate network: the same configuration, its own fresh backbone.
        first = resolve_model(options.model, weights=options.weights, num_classes=num_classes,
                              pretrained_backbone=pretrained, **overrides)
        give_data_to(first, data.class_names, settings)
        run = train_alternating(first, model, train_ds, options.out, recipe,
                                steps_per_epoch=steps_per_epoch, resume=options.resume,
                                verbose=0 if options.quiet else 1, say=_say)
    else:
        run = train_model(model, train_ds, options.out, recipe, steps_per_epoch=steps_per_epoch,
                          resume=options.resume, verbose=0 if options.quiet or not role.is_chief else 1,
                          role=role, jit_compile=options.jit_compile, backup_steps=options.backup_steps,
                          exact_resume=_exact_resume(options, strategy, repeat))
    if run["stopped_on_nan"]:
        return {"stopped_on_nan": True, "message": run["message"], "metrics": None}
    if not role.is_chief:
        return {"stopped_on_nan": False, "message": None, "metrics": None}
    if strategy is not None:
        # Scored by a one-device copy: predict under a multi-worker strategy would need every
        # worker in the loop; the chief alone reads its final weights.
        evaluated = make_model()
        evaluated.build()
        evaluated.set_weights(model.get_weights())
        model = evaluated
    if hasattr(model, "fit_region_stages"):
        # R-CNN / SPP-net: the SVMs and box regressors learn after the fine-tuning, from features
        # of the training images without augmentation; the final weights then include them.
        say("post-hoc stages: per-class SVMs (hard negative mining) and ridge box regression")
        stages_ds = make_pipeline(data.train, settings, batch_size, False,
                                  proposals=caches[options.train_split],
                                  max_proposals=options.max_proposals)
        model.fit_region_stages(stages_ds, say=say)
        model.save_weights(os.path.join(options.out, "model.weights.h5"))
    metrics = _named(evaluate_detector, model, val_ds, data.class_names, options.out, records=data.val,
                     split=options.val_split)
    _say_skipped(data, say, "bad input of this run, skipped or fixed (--on-bad "
                 f"{options.on_bad}); the other records trained and evaluated")
    return {"stopped_on_nan": False, "message": None, "metrics": metrics}


def evaluate(model_spec, data_spec, weights="default", num_classes=None, val_split="val", batch_size=None,
             classes=None, classes_file=None, out=None, proposals=None, max_proposals=2000,
             on_bad="error", precision=None):
    """Scores a model on the validation split of ``data_spec`` (printed; OUT/metrics.json when ``out``);
    returns the summary of `inference.evaluate_detector`. ``proposals``: the cache file (pattern)
    of a detector on external proposals. ``precision``: the Keras dtype policy the model computes
    in (float32, mixed_bfloat16, mixed_float16; boxes and scores stay float32)."""
    with dtype_policy(precision, "kerasdet evaluate"):
        model = model_for_inference(model_spec, weights, num_classes)
    cache = proposal_files(proposals, model, (val_split,), f"kerasdet evaluate {model_spec}")[val_split]
    data = parse_data_spec(data_spec, val_split=val_split, need_train=False,
                           class_names=read_class_names(classes, classes_file), on_bad=on_bad)
    data = _check_model_classes(model, data, f"kerasdet evaluate {model_spec}")
    val_ds = make_pipeline(data.val, model.input_settings or DEFAULT_INPUT, batch_size or 8, False,
                           proposals=cache, max_proposals=max_proposals, on_bad=on_bad)
    summary = _named(evaluate_detector, model, val_ds, data.class_names, out, records=data.val,
                     split=val_split)
    _say_skipped(data, _say, f"bad input skipped or fixed (--on-bad {on_bad})")
    return summary


def predict(model_spec, images, out, weights="default", num_classes=None, score_threshold=0.3,
            proposals=None, max_proposals=2000, precision=None):
    """Draws a model's detections on image files, folders of images and glob patterns into ``out``;
    returns the records of OUT/detections.json. ``proposals``: a cache file holding the images'
    entries (by file name), or a method name (selective_search, edge_boxes) computing each image's,
    for a detector on external proposals. ``precision``: as for `evaluate`."""
    paths = expand_image_paths(images)
    with dtype_policy(precision, "kerasdet predict"):
        model = model_for_inference(model_spec, weights, num_classes)
    if proposals is not None and "{split}" in proposals:
        raise ValueError(f"kerasdet predict: --proposals {proposals}: give one cache file (no {{split}}) "
                         "holding the images' entries")
    cache = proposal_files(proposals, model, ("predict",), f"kerasdet predict {model_spec}")["predict"]
    return predict_images(model, paths, out, class_names_of(model, model_spec), score_threshold,
                          proposals=cache, max_proposals=max_proposals)


def export(model_spec, export_dir, weights="default", num_classes=None, portable=True, image_size=None):
    """Writes a model as a SavedModel (see `kerasdet.export.export_saved_model`); returns ``export_dir``."""
    from kerasdet.export import export_saved_model

    model = model_for_inference(model_spec, weights, num_classes)
    export_saved_model(model, export_dir, portable=portable, image_size=image_size)
    return export_dir
