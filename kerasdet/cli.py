"""The `kerasdet` command: train | evaluate | predict | export | zoo | convert.

    kerasdet zoo list
    kerasdet zoo info faster_rcnn_r50_fpn
    kerasdet train faster_rcnn_r50_fpn --data voc:VOCdevkit/VOC2007 --train-split trainval \\
        --val-split test --out runs/frcnn
    kerasdet train faster_rcnn_r50_fpn --data coco:ann/instances_{split}.json:images/{split} \\
        --train-split train2017 --val-split val2017 --out runs/coco --resume
    kerasdet evaluate faster_rcnn_tiny_fpn_synthetic --data synthetic:data --out runs/eval
    kerasdet predict faster_rcnn_tiny_fpn_synthetic a.png b.png --out predictions
    kerasdet export faster_rcnn_tiny_fpn_synthetic export/tiny
    kerasdet convert maskrcnn_resnet50_fpn_coco.pth --arch maskrcnn_resnet50_fpn --out mrcnn.weights.h5

MODEL is a zoo entry name, a JSON config {"class", "arguments", "input"} or a .keras file.
The same commands are scripts in train/ (train.py, evaluate.py, predict.py, export.py).
"""
import argparse
import glob
import json
import os
import re
import sys

# Nothing heavy is imported at module level: TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, when it is
# first imported, so `main` must set it (after parsing --verbose) before anything imports tensorflow.

__all__ = ["main", "build_parser"]

# TensorFlow's C++ log lines ("I0000 00:00:1796034731.359573    6350 port.cc:153] ...") and the lines
# that come with them; kerasdet's own warnings and any other output pass.
_TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] ")
_TF_LOG_EXTRA = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
                 "To enable the following instructions:")


def _is_tensorflow_log(line):
    return bool(_TF_LOG_LINE.match(line)) or line.startswith(_TF_LOG_EXTRA)


def _import_tensorflow_quietly():
    """Imports tensorflow with its C++ start-up logs hidden.

    TF_CPP_MIN_LOG_LEVEL=3 hides the later C++ logs (CPU-feature notice, CUDA probing at the first op),
    but the oneDNN notice and the CUDA-driver probe are written before absl's logging is set up and
    ignore it, so the import runs with file descriptor 2 sent to a temporary file; afterwards every
    line of it that is not a TensorFlow log line is written to stderr again.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:  # inside a process that already has it (tests, notebooks)
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
    kept = [line for line in text.splitlines() if not _is_tensorflow_log(line)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # TensorFlow's Python-side notices go through absl


def _verbose_requested(args):
    return getattr(args, "verbose", False) or os.environ.get("KERASDET_VERBOSE", "") not in ("", "0")


def _weights_arg(value):
    return None if value in ("none", "None", "random") else value


def _add_model_args(parser, default_weights="default"):
    parser.add_argument("model", help="zoo entry name, JSON config or .keras file")
    parser.add_argument("--weights", type=_weights_arg, default=default_weights,
                        help="'default' (the entry's published weights), 'none' (random) or a "
                             ".weights.h5 path")
    parser.add_argument("--num-classes", type=int, default=None)


def _add_data_args(parser, need_train):
    parser.add_argument("--data", required=True,
                        help="voc:ROOT | coco:ANN.json:IMAGE_DIR ({split} is replaced) | synthetic:DIR")
    if need_train:
        parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--classes", default=None, metavar="A,B,C",
                        help="class names in label order (default: from the data: VOC's 20 or the names "
                             "found in the annotations, COCO's categories; evaluate: the model's)")
    parser.add_argument("--classes-file", default=None, metavar="FILE", help="class names, one a line")


def _add_verbose_arg(parser, default):
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="show TensorFlow's C++ start-up logs (also KERASDET_VERBOSE=1)")


def _add_input_args(parser):
    parser.add_argument("--min-size", type=int, nargs="+", default=None, metavar="S",
                        help="shorter image side (several: one drawn per image, multi-scale training); "
                             "replaces the entry's input settings, e.g. for small images")
    parser.add_argument("--max-size", type=int, default=None, metavar="M", help="longer side at most M")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="fixed input size (letterbox) instead of --min-size / --max-size")
    parser.add_argument("--anchor-sizes", nargs="+", default=None, metavar="SIZES",
                        help="'auto' (fitted to the training boxes) or one token per anchor level, sizes of "
                             "a level joined by commas: '16 32 64 128 256' (FPN), '64,128,256' (C4)")


def build_parser():
    parser = argparse.ArgumentParser(prog="kerasdet", description="kerasdet object-detection zoo")
    _add_verbose_arg(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="list the zoo or describe an entry")
    zoo.add_argument("action", choices=("list", "info"))
    zoo.add_argument("name", nargs="?")

    train = sub.add_parser("train", help="train a model, then evaluate it on the validation split")
    _add_model_args(train, default_weights=None)
    _add_data_args(train, need_train=True)
    train.add_argument("--out", required=True, help="run folder (checkpoints, logs, metrics.json)")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--steps-per-epoch", type=int, default=None)
    train.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: the recipe's, scaled linearly by --batch-size / the "
                            "recipe's batch)")
    train.add_argument("--weight-decay", type=float, default=None)
    train.add_argument("--momentum", type=float, default=None)
    train.add_argument("--warmup-steps", type=int, default=None,
                       help="default: the recipe's, at most 10%% of the run's steps")
    train.add_argument("--decay-epochs", type=float, nargs="*", default=None,
                       help="default: the recipe's, scaled by --epochs / the recipe's epochs")
    train.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    train.add_argument("--no-pretrained", action="store_true",
                       help="start from a random backbone even when the zoo entry names a pretrained one "
                            "(by default such entries start from it, and training stops if it is unavailable)")
    _add_input_args(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = sub.add_parser("evaluate", help="VOC mAP@0.5 and COCO AP on the validation split")
    _add_model_args(evaluate)
    _add_data_args(evaluate, need_train=False)
    evaluate.add_argument("--out", default=None, help="folder for metrics.json")

    predict = sub.add_parser("predict", help="draw detections on images")
    _add_model_args(predict)
    predict.add_argument("images", nargs="+", help="image files, folders of images or glob patterns "
                                                   "(quote them: 'photos/*.jpg')")
    predict.add_argument("--out", required=True)
    predict.add_argument("--score-threshold", type=float, default=0.3)

    export = sub.add_parser("export", help="write a SavedModel (TF OD API signatures)")
    _add_model_args(export)
    export.add_argument("export_dir")
    export.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    export.add_argument("--not-portable", action="store_true",
                        help="keep kerasdet's compiled kernels in the graph")

    convert = sub.add_parser("convert", help="convert a torchvision checkpoint (.pth) into .weights.h5")
    convert.add_argument("checkpoint", help="a torchvision-format state dict (.pth); reading it needs torch")
    convert.add_argument("--arch", required=True, choices=_CONVERTIBLE,
                         help="the torchvision architecture of the checkpoint")
    convert.add_argument("--out", required=True, help="output .weights.h5 file")
    convert.add_argument("--num-classes", type=int, default=None,
                         help="detectors: another class count (with --skip-mismatch the class layers stay random)")
    convert.add_argument("--skip-mismatch", action="store_true",
                         help="leave weights whose shape differs at their initialization instead of failing")
    for command in (zoo, train, evaluate, predict, export, convert):
        # `kerasdet train ... --verbose` as well as `kerasdet --verbose train ...`
        _add_verbose_arg(command, argparse.SUPPRESS)
    return parser


# torchvision architecture -> (zoo entry using its layout, or None for backbones)
_CONVERTIBLE = {"fasterrcnn_resnet50_fpn": "faster_rcnn_r50_fpn_torchvision",
                "maskrcnn_resnet50_fpn": "mask_rcnn_r50_fpn_torchvision",
                "resnet50": None, "resnet101": None, "mobilenet_v2": None}


def _run_convert(args):
    from kerasdet import converters

    if args.arch in ("resnet50", "resnet101"):
        model = converters.convert_resnet(args.checkpoint, depth=int(args.arch[6:]), include_top=True,
                                          skip_mismatch=args.skip_mismatch)
        usage = f"kerasdet.backbones.get({args.arch!r}, include_top=True).load_weights(...)"
    elif args.arch == "mobilenet_v2":
        from kerasdet.converters.mobilenet_v2 import convert_mobilenet_v2

        model = convert_mobilenet_v2(args.checkpoint, include_top=True)
        usage = "kerasdet.backbones.get('mobilenet_v2', include_top=True).load_weights(...)"
    else:
        model = converters.convert_detector(args.checkpoint, args.arch, num_classes=args.num_classes,
                                            skip_mismatch=args.skip_mismatch)
        entry = _CONVERTIBLE[args.arch]
        usage = f"kerasdet.zoo.load({entry!r}, weights={args.out!r}"
        usage += f", num_classes={args.num_classes})" if args.num_classes else ")"
    digest = converters.save_converted(model, args.out)
    print(f"wrote {os.path.abspath(args.out)}\nsha256 {digest}\nuse it with: {usage}")
    print("zoo entry \"weights\": " + json.dumps({"url": "<where you publish it>", "file": os.path.basename(args.out),
                                                 "sha256": digest, "size_bytes": os.path.getsize(args.out)}))
    return 0


def _class_names_of(model, model_spec):
    """The model's class names; for a model that carries none, its zoo entry's (same count only)."""
    names = getattr(model, "class_names", None)
    if names or not _is_zoo_name(model_spec):
        return list(names) if names else None
    from kerasdet import zoo

    names = zoo.info(model_spec)["class_names"]
    return names if len(names) == model.num_classes else None


def _zoo_table(names):
    """One line per entry: name, VOC mAP@0.5 (when measured), then the whole status text, in
    columns as wide as their longest cell (the status, last, may run past the terminal)."""
    from kerasdet import zoo

    rows = [("entry", "voc_map50", "status")]
    for name in names:
        entry = zoo.registry.get_entry(name)
        metric = entry.metrics.get("voc_map50")
        rows.append((name, "-" if metric is None else f"{metric:.4f}", entry.status()))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}" for row in rows)


def _run_zoo(args):
    from kerasdet import zoo

    if args.action == "list":
        print(_zoo_table(zoo.list()))
        return 0
    if not args.name:
        raise SystemExit("kerasdet zoo info NAME: give an entry name")
    print(json.dumps(zoo.info(args.name), indent=2))
    return 0


def _pretrained_choice(args):
    """--no-pretrained -> False; a zoo entry naming a pretrained backbone -> True (required);
    anything else -> None (nothing to load)."""
    if args.no_pretrained:
        return False
    if args.weights is None and _is_zoo_name(args.model):
        from kerasdet import zoo

        if zoo.registry.get_entry(args.model).pretrained_backbone:
            return True
    return None


def _is_zoo_name(model_spec):
    return not os.path.splitext(model_spec)[1]


def _run_record_of(weights):
    """run.json of the `kerasdet train` run that wrote the weights file ``weights`` (in the run folder
    or its checkpoints/), or None."""
    if not weights or weights == "default":
        return None
    folder = os.path.dirname(os.path.abspath(weights))
    candidates = [os.path.join(folder, "run.json")]
    if os.path.basename(folder) == "checkpoints":
        candidates.append(os.path.join(os.path.dirname(folder), "run.json"))
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
    return None


def _model_for_inference(args):
    """The model of evaluate / predict / export: the architecture, classes and input settings a
    training run recorded in run.json next to --weights, when there is one."""
    from kerasdet.zoo import training

    run = _run_record_of(args.weights)
    overrides = dict((run or {}).get("model_overrides") or {})
    names = (run or {}).get("class_names")
    num_classes = args.num_classes or (len(names) if names else None)
    model = training.resolve_model(args.model, weights=args.weights, num_classes=num_classes, **overrides)
    _describe_data_to(model, names, (run or {}).get("input"))
    return model


def _describe_data_to(model, class_names, input_settings):
    """Gives the model its class names and input settings (part of its config, so a .keras save keeps
    them). ``kerasdet_input`` is their older name, read by code written before them."""
    if class_names:
        model.class_names = tuple(class_names)
    if input_settings:
        model.input_settings = dict(input_settings)
        model.kerasdet_input = model.input_settings


def _input_settings(model_spec, args):
    """The run's input settings: the zoo entry's (or JSON config's) with --min-size, --max-size,
    --image-size applied."""
    from kerasdet import zoo

    if _is_zoo_name(model_spec):
        base = zoo.input_settings(model_spec)
    elif model_spec.endswith(".json"):
        with open(model_spec, encoding="utf-8") as handle:
            base = json.load(handle).get("input") or {}
    else:
        base = {}
    settings = dict(base or {"min_size": 800, "max_size": 1333})
    if args.image_size and (args.min_size or args.max_size):
        raise ValueError("give --image-size, or --min-size / --max-size, not both")
    if args.image_size:
        for key in ("min_size", "max_size", "min_size_test"):
            settings.pop(key, None)
        settings["image_size"] = list(args.image_size)
    if args.min_size:
        settings.pop("image_size", None)
        settings.pop("keep_aspect_ratio", None)
        settings.pop("min_size_test", None)
        settings["min_size"] = args.min_size[0] if len(args.min_size) == 1 else list(args.min_size)
    if args.max_size:
        if "min_size" not in settings:
            raise ValueError(f"--max-size applies to --min-size resizing; {model_spec} uses a fixed "
                             f"image_size {settings.get('image_size')} (give --min-size as well)")
        settings["max_size"] = args.max_size
    sizes = [*(args.min_size or ()), *([args.max_size] if args.max_size else ()), *(args.image_size or ())]
    if any(size < 1 for size in sizes):
        raise ValueError(f"--min-size / --max-size / --image-size must be positive, got {sizes}")
    return settings


def _describe_input(settings):
    if settings.get("image_size"):
        return f"fixed {settings['image_size'][0]}x{settings['image_size'][1]}"
    text = f"shorter side {settings['min_size']}"
    return text + (f", longer side <= {settings['max_size']}" if settings.get("max_size") else "")


def _check_model_classes(model, data, where):
    """Aligns the data's labels to the model's classes; a model whose classes differ from the data's
    is an error naming both lists."""
    from kerasdet.zoo.data_spec import align_classes

    names = getattr(model, "class_names", None)
    if names:
        return align_classes(data, list(names), where, "the model's classes")
    if model.num_classes != len(data.class_names):
        raise ValueError(f"{where}: the model has {model.num_classes} classes but the data set has "
                         f"{len(data.class_names)}: {data.class_names}")
    return data


def _scratch_overrides(args, pretrained):
    """Constructor overrides for a backbone that starts from random weights, with the sentence that
    says so; ({}, None) when the backbone starts from trained weights or cannot be rebuilt."""
    from kerasdet.zoo import training

    starts_random = args.weights is None and pretrained is not True
    arguments = training.model_arguments(args.model) if starts_random else None
    if not arguments or "backbone" not in arguments:
        return {}, None
    config, how = training.from_scratch_backbone_config(arguments["backbone"], arguments.get("backbone_config"))
    changed = {"backbone_config": config} if config != dict(arguments.get("backbone_config") or {}) else {}
    return changed, f"training from scratch: {how}"


def _anchor_layout(model):
    """(sizes per level, ratios per level, RPN positive IoU) of an anchor-based model, or None."""
    generator = getattr(model, "anchor_generator", None)
    rpn = getattr(model, "rpn_settings", None)
    if generator is None or rpn is None:
        return None
    return ([list(s) for s in generator.sizes], [list(r) for r in generator.aspect_ratios],
            float(rpn["positive_iou"]))


def _anchor_overrides(args, data, settings, build_probe):
    """{"anchor_sizes": ...} for --anchor-sizes (explicit, or auto from the training boxes), with a
    line to print; ({}, None) without the flag."""
    from kerasdet.zoo import anchor_fit

    if not args.anchor_sizes:
        return {}, None
    layout = _anchor_layout(build_probe())
    if layout is None:
        raise ValueError(f"--anchor-sizes: {args.model} has no anchors")
    counts = [len(level) for level in layout[0]]
    if args.anchor_sizes == ["auto"]:
        widths, heights = anchor_fit.training_box_sizes(data.train, settings)
        sizes = anchor_fit.auto_anchor_sizes(widths, heights, counts)
        lo, hi = (f"{q:.0%}" for q in anchor_fit.AUTO_QUANTILES)
        line = (f"anchor sizes (auto: log-spaced from the {lo} to the {hi} quantile of the training boxes' "
                f"sqrt(w*h)): {sizes} (the entry's: {layout[0]})")
    else:
        sizes = anchor_fit.parse_anchor_sizes(args.anchor_sizes, len(counts), counts)
        line = f"anchor sizes: {sizes} (the entry's: {layout[0]})"
    return {"anchor_sizes": sizes}, line


def _print_anchor_fit(model, data, settings):
    from kerasdet.zoo import anchor_fit

    layout = _anchor_layout(model)
    if layout is None or data.train is None:
        return None
    widths, heights = anchor_fit.training_box_sizes(data.train, settings)
    fit = anchor_fit.anchor_fit(widths, heights, *layout)
    print(anchor_fit.format_anchor_fit(fit), flush=True)
    return fit


def _run_train(args):
    import keras

    from kerasdet.zoo import training
    from kerasdet.zoo.data_spec import align_classes, parse_data_spec, read_class_names

    keras.utils.set_random_seed(args.seed)
    data = parse_data_spec(args.data, args.train_split, args.val_split,
                           class_names=read_class_names(args.classes, args.classes_file))
    print(f"classes ({len(data.class_names)}, {data.class_source}): {', '.join(data.class_names)}", flush=True)
    previous = _run_record_of(args.weights)
    if previous and previous.get("class_names"):
        align_classes(data, previous["class_names"], f"--weights {args.weights}",
                      "the classes these weights were trained on")
    if args.num_classes is not None and args.num_classes != len(data.class_names):
        raise ValueError(f"--num-classes {args.num_classes}, but the data set has {len(data.class_names)} "
                         f"classes: {data.class_names}")
    settings = _input_settings(args.model, args)
    print(f"input: {_describe_input(settings)}", flush=True)
    pretrained = _pretrained_choice(args)
    overrides, scratch_note = _scratch_overrides(args, pretrained)

    num_classes = len(data.class_names)
    # The entry's anchor layout comes from a model built without weights (only with --anchor-sizes).
    anchors, anchor_note = _anchor_overrides(
        args, data, settings,
        lambda: training.resolve_model(args.model, weights=None, num_classes=num_classes, **overrides))
    overrides.update(anchors)
    model = training.resolve_model(args.model, weights=args.weights, num_classes=num_classes,
                                   pretrained_backbone=pretrained, **overrides)
    _describe_data_to(model, data.class_names, settings)
    backbone_weights = getattr(model, "kerasdet_backbone_weights", None)
    if args.weights is None:
        print(f"backbone: {backbone_weights or 'random initialization'}"
              + (" (--no-pretrained)" if args.no_pretrained and backbone_weights is None else ""), flush=True)
    if scratch_note:
        print(scratch_note, flush=True)
    if anchor_note:
        print(anchor_note, flush=True)
    fit = _print_anchor_fit(model, data, settings)

    recipe_source = training_recipe_source(args.model)
    batch_size = args.batch_size or training.TrainingRecipe(recipe_source)["batch_size"]
    train_ds = training.make_pipeline(data.train, settings, batch_size, True, seed=args.seed)
    val_ds = training.make_pipeline(data.val, settings, batch_size, False)
    steps = args.steps_per_epoch or int(train_ds.cardinality().numpy())
    recipe = training.adapt_recipe(
        recipe_source, steps, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        weight_decay=args.weight_decay, momentum=args.momentum, warmup_steps=args.warmup_steps,
        decay_epochs=args.decay_epochs)
    print(training.format_recipe(recipe), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run.json"), "w", encoding="utf-8") as handle:
        json.dump({"argv": sys.argv, "model": args.model, "data": args.data, "recipe": dict(recipe),
                   "weights": args.weights, "backbone_weights": backbone_weights,
                   "training_from_scratch": scratch_note, "model_overrides": overrides,
                   "input": settings, "class_names": list(data.class_names),
                   "class_source": data.class_source, "anchor_fit": fit}, handle, indent=2)
    if args.steps_per_epoch is not None:
        train_ds = train_ds.repeat()
    run = training.train_model(model, train_ds, args.out, recipe, steps_per_epoch=args.steps_per_epoch,
                               resume=args.resume, verbose=0 if args.quiet else 1)
    if run["stopped_on_nan"]:
        print(run["message"], file=sys.stderr)
        return 3
    training.evaluate_detector(model, val_ds, data.class_names, args.out, records=data.val,
                               split=args.val_split)
    print(f"results in {os.path.abspath(args.out)} (metrics.json, model.weights.h5, checkpoints/)")
    return 0


def training_recipe_source(model_spec):
    """The zoo entry's recipe (its batch size is the reference for learning-rate scaling); {} for a
    JSON config or .keras file (then TrainingRecipe.DEFAULTS)."""
    if not _is_zoo_name(model_spec):
        return {}
    from kerasdet import zoo

    return zoo.info(model_spec)["recipe"]


def _run_evaluate(args):
    from kerasdet.zoo import training
    from kerasdet.zoo.data_spec import parse_data_spec, read_class_names

    model = _model_for_inference(args)
    data = parse_data_spec(args.data, val_split=args.val_split, need_train=False,
                           class_names=read_class_names(args.classes, args.classes_file))
    data = _check_model_classes(model, data, f"kerasdet evaluate {args.model}")
    settings = getattr(model, "kerasdet_input", None) or {"min_size": 800, "max_size": 1333}
    val_ds = training.make_pipeline(data.val, settings, args.batch_size or 8, False)
    training.evaluate_detector(model, val_ds, data.class_names, args.out, records=data.val,
                               split=args.val_split)
    return 0


# What `kerasdet predict FOLDER` picks up: the formats kerasdet.data.images reads.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _expand_image_args(items):
    """Image files from files, folders (their images, not recursive) and glob patterns, in the
    given order, each file once; anything that names no image is an error naming it."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.lower().endswith(_IMAGE_SUFFIXES)
                           and os.path.isfile(os.path.join(item, name)))
            if not found:
                raise FileNotFoundError(f"folder {item!r} holds no image ({', '.join(_IMAGE_SUFFIXES)})")
        elif os.path.isfile(item):
            found = [item]
        elif any(char in item for char in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"pattern {item!r} matches no file")
        else:
            raise FileNotFoundError(f"image {item!r} does not exist")
        paths.extend(p for p in found if p not in paths)
    stems = {}
    for path in paths:  # the PNGs are named by stem: two inputs must not write the same file
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:
            raise ValueError(f"images {stems[stem]!r} and {path!r} would both be written as {stem}.png; "
                             "predict them into separate --out folders")
        stems[stem] = path
    return paths


def _run_predict(args):
    from kerasdet.zoo import training

    images = _expand_image_args(args.images)
    model = _model_for_inference(args)
    records = training.predict_images(model, images, args.out, _class_names_of(model, args.model),
                                      args.score_threshold)
    for record in records:
        print(f"{record['image']}: {len(record['detections'])} detections -> {record['output']}")
    print(f"detections.json in {os.path.abspath(args.out)}")
    return 0


def _run_export(args):
    from kerasdet.export import export_saved_model

    model = _model_for_inference(args)
    export_saved_model(model, args.export_dir, portable=not args.not_portable,
                       image_size=args.image_size)
    print(f"SavedModel written to {os.path.abspath(args.export_dir)}")
    return 0


_COMMANDS = {"zoo": _run_zoo, "train": _run_train, "evaluate": _run_evaluate,
             "predict": _run_predict, "export": _run_export, "convert": _run_convert}


def main(argv=None):
    """Entry point of the `kerasdet` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not _verbose_requested(args):
        _import_tensorflow_quietly()
    from kerasdet.zoo import UnknownModelError, WeightsError

    try:
        return _COMMANDS[args.command](args)
    except (UnknownModelError, WeightsError, FileNotFoundError, ValueError, ImportError) as error:
        print(f"kerasdet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
