"""The `kerasdet` command: train | evaluate | predict | export | zoo | convert | proposals.

    kerasdet zoo list
    kerasdet zoo info faster_rcnn_r50_fpn
    kerasdet train faster_rcnn_r50_fpn --data voc:VOCdevkit/VOC2007 --train-split trainval \\
        --val-split test --out runs/frcnn
    kerasdet train faster_rcnn_r50_fpn --data coco:ann/instances_{split}.json:images/{split} \\
        --train-split train2017 --val-split val2017 --out runs/coco --resume
    kerasdet evaluate faster_rcnn_tiny_fpn_synthetic --data synthetic:data --out runs/eval
    kerasdet predict faster_rcnn_tiny_fpn_synthetic a.png b.png --out predictions
    kerasdet export faster_rcnn_tiny_fpn_synthetic export/tiny
    kerasdet proposals --data synthetic:data --out proposals.npz      (-> proposals_train.npz, _val.npz)
    kerasdet train fast_rcnn_r50 --data voc:VOCdevkit/VOC2007 --proposals proposals_{split}.npz ...
    kerasdet convert maskrcnn_resnet50_fpn_coco.pth --arch maskrcnn_resnet50_fpn --out mrcnn.weights.h5

MODEL is a zoo entry name, a JSON config {"class", "arguments", "input"} or a .keras file.
The same commands are scripts in train/ (train.py, evaluate.py, predict.py, export.py). This module
parses arguments and prints; the runs themselves are kerasdet.engine.runs.
"""
import argparse
import dataclasses
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
                        help="voc:ROOT | coco:ANN.json:IMAGE_DIR ({split} is replaced) | synthetic:DIR | "
                             "synthetic-single:DIR")
    if need_train:
        parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--classes", default=None, metavar="A,B,C",
                        help="class names in label order (default: from the data: VOC's 20 or the names "
                             "found in the annotations, COCO's categories; evaluate: the model's)")
    parser.add_argument("--classes-file", default=None, metavar="FILE", help="class names, one a line")
    parser.add_argument("--on-bad", choices=("error", "skip"), default="error",
                        help="bad records (missing / corrupt / undecodable images, malformed annotations): "
                             "'error' (default) lists every one found, file and reason, and stops before "
                             "training; 'skip' drops them and prints the counted list")
    parser.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                        help="refuse images declaring more than N pixels before decoding them "
                             "(decompression bombs; default KERASDET_MAX_IMAGE_PIXELS or 100000000)")


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


_PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _add_inference_precision_arg(parser):
    parser.add_argument("--precision", choices=_PRECISIONS, default=None,
                        help="Keras dtype policy the model computes in (default float32; boxes and "
                             "scores stay float32). On CPUs with AMX, mixed_bfloat16 took Faster R-CNN "
                             "R50-FPN inference from 1.81 to 0.70 s (docs/SPEED.md); detections differ "
                             "slightly from float32's")


def _add_proposal_args(parser, predict=False):
    parser.add_argument("--proposals", default=None, metavar="FILE",
                        help="region proposal cache of `kerasdet proposals` for detectors on external "
                             "proposals (Fast R-CNN, R-CNN, SPP-net); '{split}' in FILE is replaced by the "
                             "split name" + ("; or selective_search / edge_boxes to compute each image's "
                                             "proposals here" if predict else ""))
    parser.add_argument("--max-proposals", type=int, default=2000, metavar="N",
                        help="proposals per image read from the cache (its first N)")


def _split_file(out, split):
    """The cache file of one split: '{split}' in OUT replaced, else OUT's stem + '_' + split."""
    if "{split}" in out:
        return out.replace("{split}", split)
    stem, ext = os.path.splitext(out)
    return f"{stem}_{split}{ext or '.npz'}"


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
    train.add_argument("--lr", dest="learning_rate", type=float, default=None,
                       help="learning rate (default: the recipe's, scaled linearly by --batch-size / the "
                            "recipe's batch)")
    train.add_argument("--weight-decay", type=float, default=None)
    train.add_argument("--momentum", type=float, default=None)
    train.add_argument("--warmup-steps", type=int, default=None,
                       help="default: the recipe's, at most 10%% of the run's steps")
    train.add_argument("--decay-epochs", type=float, nargs="*", default=None,
                       help="default: the recipe's, scaled by --epochs / the recipe's epochs")
    train.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    train.add_argument("--backup-steps", type=int, default=None, metavar="N",
                       help="save the --resume state every N steps as well as every epoch (default "
                            "100; 0: every epoch only): a killed run repeats at most N steps")
    train.add_argument("--exact-resume", action="store_true",
                       help="with --resume and --steps-per-epoch: replay the data stream up to the saved "
                            "step (read and augmented, not trained on), so the resumed run sees the "
                            "batches an uninterrupted run would and ends with its weights")
    train.add_argument("--no-pretrained", action="store_true",
                       help="start from a random backbone even when the zoo entry names a pretrained one "
                            "(by default such entries start from it, and training stops if it is unavailable)")
    train.add_argument("--alternating", action="store_true",
                       help="the Faster R-CNN paper's 4-step alternating training (RPN; detector on its "
                            "proposals; RPN on the frozen shared convs; detector head), each step the "
                            "recipe's epochs; writes OUT/step1..4.weights.h5")
    _add_input_args(train)
    train.add_argument("--strategy", choices=("none", "mirrored", "multi-worker"), default="none",
                       help="tf.distribute: 'mirrored' = every GPU of this machine; 'multi-worker' = one "
                            "process per machine, the cluster read from TF_CONFIG (docs/DISTRIBUTED.md). "
                            "--batch-size is the global batch over all replicas")
    train.add_argument("--precision", choices=_PRECISIONS,
                       default=None, help="Keras dtype policy (default float32); mixed_float16 scales "
                                          "the loss dynamically")
    train.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto",
                       help="XLA: 'auto' turns it on only where every layer supports it (not while "
                            "the compiled kernels are in use); 'on' traces the kernels' pure-TF twins")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_proposal_args(train)

    evaluate = sub.add_parser("evaluate", help="VOC mAP@0.5 and COCO AP on the validation split")
    _add_model_args(evaluate)
    _add_data_args(evaluate, need_train=False)
    evaluate.add_argument("--out", default=None, help="folder for metrics.json")
    _add_proposal_args(evaluate)
    _add_inference_precision_arg(evaluate)

    predict = sub.add_parser("predict", help="draw detections on images")
    _add_model_args(predict)
    predict.add_argument("images", nargs="+", help="image files, folders of images or glob patterns "
                                                   "(quote them: 'photos/*.jpg')")
    predict.add_argument("--out", required=True)
    predict.add_argument("--score-threshold", type=float, default=0.3)
    _add_proposal_args(predict, predict=True)
    _add_inference_precision_arg(predict)

    proposals = sub.add_parser("proposals", help="compute the region proposals of a data set into a cache "
                                                 "(selective search / EdgeBoxes; needs kerasdet[proposals])")
    proposals.add_argument("--data", required=True,
                           help="voc:ROOT | coco:ANN.json:IMAGE_DIR | synthetic:DIR | synthetic-single:DIR")
    proposals.add_argument("--out", required=True, metavar="FILE",
                           help="cache file: one per split, FILE's stem + '_SPLIT' (proposals.npz -> "
                                "proposals_train.npz, proposals_val.npz) or '{split}' in FILE replaced")
    proposals.add_argument("--method", choices=("selective_search", "edge_boxes"), default="selective_search")
    proposals.add_argument("--mode", choices=("fast", "quality", "single"), default="fast",
                           help="selective search mode (default: fast, R-CNN's)")
    proposals.add_argument("--split", default="train,val", metavar="A,B",
                           help="splits to compute (synthetic: train and/or val)")
    proposals.add_argument("--max-proposals", type=int, default=2000, metavar="N")
    proposals.add_argument("--max-side", type=int, default=None, metavar="S",
                           help="compute on copies shrunk to this longer side (boxes in original pixels)")
    proposals.add_argument("--edge-model", default=None, metavar="FILE",
                           help="EdgeBoxes: the structured-edge model.yml.gz (default: model-free "
                                "gradient edges)")
    proposals.add_argument("--classes", default=None, metavar="A,B,C")
    proposals.add_argument("--classes-file", default=None, metavar="FILE")
    proposals.add_argument("--quiet", action="store_true", help="no progress bar")

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
    for command in (zoo, train, evaluate, predict, export, convert, proposals):
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


def _weights_cell(entry):
    """What the entry's weights are (trained here / published / pretrained backbone / random) and, for
    converted checkpoints, whether the converted file is already in KERASDET_HOME."""
    from kerasdet.zoo import pretrained

    kind = entry.weights_kind()
    if entry.converts_checkpoint:
        cached = pretrained.cached_weights(entry.name, entry.weights)[0]
        return f"{kind}, {'converted' if cached else 'fetched on first load'}"
    if entry.pretrained_backbone and not entry.has_weights:
        return f"{kind} ({entry.pretrained_backbone})"
    return kind


def _published_cell(entry):
    """The publisher's figures with their source; never kerasdet's own measurements."""
    figures = entry.published_metrics
    if not figures:
        return "-"
    labels = {"box_ap": "box AP", "mask_ap": "mask AP", "map50": "mAP@0.5"}
    shown = ", ".join(f"{labels[key]} {value}" for key, value in figures.items() if key in labels)
    return f"{shown} ({figures['source'].split(' (')[0]})"


def _zoo_table(names):
    """One line per entry: name, kind of weights, VOC mAP@0.5 measured here (when measured), the
    publisher's reported figure and its source, then the whole status text, in columns as wide as
    their longest cell (the status, last, may run past the terminal)."""
    from kerasdet import zoo

    rows = [("entry", "weights", "voc_map50 (measured here)", "reported by publisher", "status")]
    for name in names:
        entry = zoo.registry.get_entry(name)
        metric = entry.metrics.get("voc_map50")
        rows.append((name, _weights_cell(entry), "-" if metric is None else f"{metric:.4f}",
                     _published_cell(entry), entry.status()))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:<{widths[3]}}  "
                     f"{row[4]}" for row in rows)


def _run_zoo(args):
    from kerasdet import zoo

    if args.action == "list":
        print(_zoo_table(zoo.list()))
        return 0
    if not args.name:
        raise SystemExit("kerasdet zoo info NAME: give an entry name")
    print(json.dumps(zoo.info(args.name), indent=2))
    return 0


def _training_options(args):
    from kerasdet.engine.runs import TrainingOptions

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainingOptions)}
    values["jit_compile"] = {"auto": "auto", "on": True, "off": False}[args.jit_compile]
    if values["backup_steps"] is None:
        values.pop("backup_steps")
    return TrainingOptions(**values)


def _run_train(args):
    from kerasdet.engine import runs

    run = runs.train(_training_options(args))
    if run["stopped_on_nan"]:
        print(run["message"], file=sys.stderr)
        return 3
    files = "step1..4.weights.h5, step1..4/checkpoints/" if args.alternating else "checkpoints/"
    print(f"results in {os.path.abspath(args.out)} (metrics.json, model.weights.h5, {files})")
    return 0


def _run_evaluate(args):
    from kerasdet.engine import runs

    runs.evaluate(args.model, args.data, weights=args.weights, num_classes=args.num_classes,
                  val_split=args.val_split, batch_size=args.batch_size, classes=args.classes,
                  classes_file=args.classes_file, out=args.out, proposals=args.proposals,
                  max_proposals=args.max_proposals, on_bad=args.on_bad, precision=args.precision)
    return 0


def _run_predict(args):
    from kerasdet.engine import runs

    records = runs.predict(args.model, args.images, args.out, weights=args.weights,
                           num_classes=args.num_classes, score_threshold=args.score_threshold,
                           proposals=args.proposals, max_proposals=args.max_proposals,
                           precision=args.precision)
    for record in records:
        print(f"{record['image']}: {len(record['detections'])} detections -> {record['output']}")
    print(f"detections.json in {os.path.abspath(args.out)}")
    return 0


def _split_dataset(spec, split, class_names):
    """The DetectionDataset of one split of a --data spec."""
    from kerasdet.data.data_spec import parse_data_spec

    if spec.split(":", 1)[0] in ("synthetic", "synthetic-single"):
        if split not in ("train", "val"):
            raise ValueError(f"--data {spec}: the synthetic sets have the splits train and val, not {split!r}")
        data = parse_data_spec(spec, need_train=split == "train", class_names=class_names)
        return data.train if split == "train" else data.val
    return parse_data_spec(spec, val_split=split, need_train=False, class_names=class_names).val


def _run_proposals(args):
    import time

    from kerasdet.data.data_spec import read_class_names
    from kerasdet.data.proposals import proposal_recall, write_proposal_cache

    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits:
        raise ValueError("--split: give at least one split name")
    if args.max_proposals < 1:
        raise ValueError(f"--max-proposals must be >= 1, got {args.max_proposals}")
    names = read_class_names(args.classes, args.classes_file)
    settings = {"max_proposals": args.max_proposals, "max_side": args.max_side}
    if args.method == "selective_search":
        settings["mode"] = args.mode
    elif args.edge_model:
        settings["model_path"] = args.edge_model
    for split in splits:
        dataset = _split_dataset(args.data, split, names)
        path = _split_file(args.out, split)
        start = time.perf_counter()
        cache = write_proposal_cache(dataset, path, args.method, progress=not args.quiet, **settings)
        wall = time.perf_counter() - start
        recall = proposal_recall(dataset, cache)
        per_image = cache.metadata.get("seconds_per_image")
        timing = (f"{per_image:.3f} s per image computed" if per_image is not None
                  else "all images from a resumed partial file")
        print(f"{split}: {path}  {len(cache)} images, {recall['mean_proposals']:.0f} proposals per image, "
              f"recall@0.5 {recall['recall']['0.5']:.4f}  recall@0.7 {recall['recall']['0.7']:.4f} "
              f"({recall['num_objects']} objects), {timing} ({wall:.1f} s in all)")
    return 0


def _run_export(args):
    from kerasdet.engine import runs

    runs.export(args.model, args.export_dir, weights=args.weights, num_classes=args.num_classes,
                portable=not args.not_portable, image_size=args.image_size)
    print(f"SavedModel written to {os.path.abspath(args.export_dir)}")
    return 0


_COMMANDS = {"zoo": _run_zoo, "train": _run_train, "evaluate": _run_evaluate,
             "predict": _run_predict, "export": _run_export, "convert": _run_convert,
             "proposals": _run_proposals}


def main(argv=None):
    """Entry point of the `kerasdet` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not _verbose_requested(args):
        _import_tensorflow_quietly()
    from kerasdet.data.proposals import MissingProposalsError
    from kerasdet.zoo import UnknownModelError, WeightsError

    if getattr(args, "max_image_pixels", None) is not None:
        from kerasdet.data.images import set_max_image_pixels

        set_max_image_pixels(args.max_image_pixels)
    try:
        return _COMMANDS[args.command](args)
    except (UnknownModelError, WeightsError, FileNotFoundError, ValueError, ImportError,
            MissingProposalsError, OSError) as error:
        print(f"kerasdet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
