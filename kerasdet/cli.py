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
import json
import os
import sys

__all__ = ["main", "build_parser"]


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


def build_parser():
    parser = argparse.ArgumentParser(prog="kerasdet", description="kerasdet object-detection zoo")
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
    train.add_argument("--lr", type=float, default=None, help="base learning rate")
    train.add_argument("--weight-decay", type=float, default=None)
    train.add_argument("--momentum", type=float, default=None)
    train.add_argument("--warmup-steps", type=int, default=None)
    train.add_argument("--decay-epochs", type=float, nargs="*", default=None)
    train.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    train.add_argument("--no-pretrained", action="store_true",
                       help="start from a random backbone even when the zoo entry names a pretrained one "
                            "(by default such entries start from it, and training stops if it is unavailable)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    evaluate = sub.add_parser("evaluate", help="VOC mAP@0.5 and COCO AP on the validation split")
    _add_model_args(evaluate)
    _add_data_args(evaluate, need_train=False)
    evaluate.add_argument("--out", default=None, help="folder for metrics.json")

    predict = sub.add_parser("predict", help="draw detections on images")
    _add_model_args(predict)
    predict.add_argument("images", nargs="+")
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


def _class_names_of(model_spec):
    from kerasdet import zoo

    try:
        return zoo.info(model_spec)["class_names"]
    except (KeyError, FileNotFoundError):
        return None


def _run_zoo(args):
    from kerasdet import zoo

    if args.action == "list":
        for name in zoo.list():
            entry = zoo.registry.get_entry(name)
            metric = entry.metrics.get("voc_map50")
            extra = f"  voc_map50={metric}" if metric is not None else ""
            print(f"{name:32s} {entry.status()[:60]}{extra}")
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
    if args.weights is None and not os.path.splitext(args.model)[1]:
        from kerasdet import zoo

        if zoo.registry.get_entry(args.model).pretrained_backbone:
            return True
    return None


def _run_train(args):
    import keras

    from kerasdet.zoo import training
    from kerasdet.zoo.data_spec import parse_data_spec

    keras.utils.set_random_seed(args.seed)
    data = parse_data_spec(args.data, args.train_split, args.val_split)
    num_classes = args.num_classes or len(data.class_names)
    pretrained = _pretrained_choice(args)
    model = training.resolve_model(args.model, weights=args.weights, num_classes=num_classes,
                                   pretrained_backbone=pretrained)
    backbone_weights = getattr(model, "kerasdet_backbone_weights", None)
    if args.weights is None:
        print(f"backbone: {backbone_weights or 'random initialization'}"
              + (" (--no-pretrained)" if args.no_pretrained and backbone_weights is None else ""), flush=True)
    recipe_source = {}
    if not os.path.splitext(args.model)[1]:
        from kerasdet import zoo

        recipe_source = zoo.info(args.model)["recipe"]
    recipe = training.TrainingRecipe(
        recipe_source, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        weight_decay=args.weight_decay, momentum=args.momentum, warmup_steps=args.warmup_steps,
        decay_epochs=args.decay_epochs)
    settings = getattr(model, "kerasdet_input", None) or {"min_size": 800, "max_size": 1333}
    train_ds = training.make_pipeline(data.train, settings, recipe["batch_size"], True, seed=args.seed)
    val_ds = training.make_pipeline(data.val, settings, recipe["batch_size"], False)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "run.json"), "w", encoding="utf-8") as handle:
        json.dump({"argv": sys.argv, "model": args.model, "data": args.data, "recipe": dict(recipe),
                   "weights": args.weights, "backbone_weights": backbone_weights,
                   "input": settings, "class_names": data.class_names}, handle, indent=2)
    steps = args.steps_per_epoch
    if steps is not None:
        train_ds = train_ds.repeat()
    run = training.train_model(model, train_ds, args.out, recipe, steps_per_epoch=steps,
                               resume=args.resume, verbose=0 if args.quiet else 1)
    if run["stopped_on_nan"]:
        print(run["message"], file=sys.stderr)
        return 3
    training.evaluate_detector(model, val_ds, data.class_names, args.out, records=data.val,
                               split=args.val_split)
    print(f"results in {os.path.abspath(args.out)} (metrics.json, model.weights.h5, checkpoints/)")
    return 0


def _run_evaluate(args):
    from kerasdet.zoo import training
    from kerasdet.zoo.data_spec import parse_data_spec

    data = parse_data_spec(args.data, val_split=args.val_split, need_train=False)
    model = training.resolve_model(args.model, weights=args.weights, num_classes=args.num_classes)
    settings = getattr(model, "kerasdet_input", None) or {"min_size": 800, "max_size": 1333}
    val_ds = training.make_pipeline(data.val, settings, args.batch_size or 8, False)
    training.evaluate_detector(model, val_ds, data.class_names, args.out, records=data.val,
                               split=args.val_split)
    return 0


def _run_predict(args):
    from kerasdet.zoo import training

    model = training.resolve_model(args.model, weights=args.weights, num_classes=args.num_classes)
    records = training.predict_images(model, args.images, args.out, _class_names_of(args.model),
                                      args.score_threshold)
    for record in records:
        print(f"{record['image']}: {len(record['detections'])} detections -> {record['output']}")
    print(f"detections.json in {os.path.abspath(args.out)}")
    return 0


def _run_export(args):
    from kerasdet.export import export_saved_model
    from kerasdet.zoo import training

    model = training.resolve_model(args.model, weights=args.weights, num_classes=args.num_classes)
    export_saved_model(model, args.export_dir, portable=not args.not_portable,
                       image_size=args.image_size)
    print(f"SavedModel written to {os.path.abspath(args.export_dir)}")
    return 0


_COMMANDS = {"zoo": _run_zoo, "train": _run_train, "evaluate": _run_evaluate,
             "predict": _run_predict, "export": _run_export, "convert": _run_convert}


def main(argv=None):
    """Entry point of the `kerasdet` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from kerasdet.zoo import UnknownModelError, WeightsError

    try:
        return _COMMANDS[args.command](args)
    except (UnknownModelError, WeightsError, FileNotFoundError, ValueError, ImportError) as error:
        print(f"kerasdet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
