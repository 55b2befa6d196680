#!/usr/bin/env python
"""OverFeat (Sermanet et al., ICLR 2014) on the single-object synthetic set: table 2's fine / coarse
stride and 1 / 4 / 6 scales, and section 3.5's point that dense evaluation of the whole image is
much cheaper than evaluating the same windows one by one. One JSON report on stdout (progress on
stderr), also written to `--out` when given.

    python benchmarks/overfeat.py [--weights shipped|train] [--epochs N] [--sizes 128,256]
                                  [--repeats 3] [--out overfeat.json]

Model: the zoo entry overfeat_tiny_localization_synthetic, with its shipped weights, or (`--weights
train`, the default while none are shipped) trained from its recipe on the synthetic-single set in
`--work`, seeded, with the calls of train/make_shipped_weights.py.

protocols: evaluate_localization on the 64 held-out images for each row of table 2
  (coarse_1_scale, fine_1_scale, fine_4_scales, fine_6_scales; model.protocol picks the scales).

speed, for each image size (a held-out image resized to S x S), median of `--repeats` timed runs
after a warm-up call, every network call in a tf.function:
  dense           model.dense on the whole image (fine stride, and coarse stride);
  window_by_window  every window behind the dense map, cropped (model.window px square, boxes from
                  dense's `windows`) and run through the same network one by one (in chunks of
                  `--chunk` windows): backbone -> its own last pooling -> classifier and regressor,
                  i.e. the network as trained on a window, 1 x 1 output per window. Cropping is
                  done before the clock starts; only the network is timed.
  multi_scale     model.classify (dense over every scale, no flips) with 1 scale vs the six.
Consistency: a window-sized crop sees zero padding where the dense pass sees the neighbouring
pixels (the tiny network pads every conv), so its output differs from the dense map's; the report
gives that difference, and checks exactness (max abs difference < 1e-3, asserted) on crops that
carry enough context around the window for the padding not to reach it (the `halo_check`).

Duration on 2 shared CPU cores: about 2.5 min with shipped weights at load ~5 (evaluating the four
table-2 rows takes most of it, fine_6_scales the most); with `--weights train` add the training (the
recipe's 30 epochs took 270 s at load ~4). Figures measured: docs/SPEED.md, "OverFeat: dense vs
window-by-window evaluation".
"""
import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ENTRY = "overfeat_tiny_localization_synthetic"


def log(message):
    print(message, file=sys.stderr, flush=True)


def median_seconds(fn, repeats):
    fn()  # warm-up: tracing and first-call allocations stay out of the figure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def get_model(args, entry, data):
    import keras

    from kerasdet import engine, zoo

    if args.weights == "shipped":
        return zoo.load(ENTRY), {"entry": ENTRY, "weights": "shipped", "epochs": None}
    keras.utils.set_random_seed(args.seed)
    model = zoo.build(ENTRY)
    recipe = engine.TrainingRecipe(entry.recipe, epochs=args.epochs)
    train_ds = engine.make_pipeline(data.train, entry.input, recipe["batch_size"], True, seed=args.seed)
    log(f"training {ENTRY} for {recipe['epochs']} epochs in {args.work}")
    start = time.perf_counter()
    # Keras prints its progress on stdout, which carries only the JSON report here.
    with contextlib.redirect_stdout(sys.stderr):
        run = engine.train_model(model, train_ds, os.path.join(args.work, "run"), recipe, verbose=2)
    if run["stopped_on_nan"]:
        raise SystemExit(f"training stopped on NaN: {run['message']}")
    return model, {"entry": ENTRY, "weights": "trained here", "epochs": int(recipe["epochs"]),
                   "seed": args.seed, "train_seconds": round(time.perf_counter() - start, 1)}


def context_margin(model):
    """Pixels of context a crop needs on each side so that the zero padding of the backbone's convs
    cannot reach the features of the window: each padded k x k conv spreads the border inward by
    k // 2 cells at its input's stride. Rounded up to the feature stride so the crop stays on the
    feature grid."""
    from kerasdet.backbones.overfeat import OVERFEAT_CONVS

    spill, stride = 0, 1
    for _, kernel, conv_stride, pad, pool in OVERFEAT_CONVS[model.variant]:
        if pad:
            spill += (kernel // 2) * stride
        stride *= conv_stride * (pool or 1)
    step = model.feature_stride
    return int(math.ceil(spill / step) * step)


def speed_for_size(model, image, size, args):
    import numpy as np
    import tensorflow as tf

    from kerasdet.ops.overfeat import pooled_size

    image = tf.image.resize(tf.cast(image, tf.float32)[None], (size, size))
    pixels = image.numpy()[0]
    w, fs = model.window, model.feature_stride
    margin = context_margin(model)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)

    @tf.function(input_signature=[spec])
    def window_net(crops):
        # The network on whole windows: its own pooling (one offset), classifier and regressor.
        features = model.backbone(crops, training=False)["features"]
        pooled = tf.nn.max_pool2d(features, model.pool, model.pool, "VALID")
        return model.classifier(pooled, training=False), model.regressor(pooled, training=False)

    @tf.function(input_signature=[spec])
    def context_net(crops):
        # As window_net on crops of window + 2 * margin px: the margin's features are dropped
        # before pooling, so padding never enters the window's output.
        features = model.backbone(crops, training=False)["features"]
        m = margin // fs
        features = features[:, m:m + w // fs, m:m + w // fs]
        pooled = tf.nn.max_pool2d(features, model.pool, model.pool, "VALID")
        return model.classifier(pooled, training=False)

    # model.dense on one window-sized crop: its offset pooling keeps floor((n - (p - 1)) / p) cells
    # so that all p^2 copies share one size, which leaves a window-sized crop short of the
    # classifier's k x k input; window_net therefore pools the crop as the network does in training.
    try:
        crop_map = [int(v) for v in model.dense(image[:, :w, :w], fine_stride=False)[0].shape[1:3]]
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        cells = pooled_size(w // fs, model.pool)
        crop_map = (f"fails ({type(error).__name__}): the offset pooling leaves {cells} x {cells} "
                    f"cells, less than the classifier's {model.kernel} x {model.kernel} input")
    smallest = w + (model.pool - 1) * fs
    result = {"image_size": [size, size], f"dense_on_one_{w}px_window_crop": crop_map,
              f"dense_on_{smallest}px_crop_map_fine": [
                  int(v) for v in model.dense(image[:, :smallest, :smallest], fine_stride=True)[0].shape[1:3]]}
    for fine in (True, False):
        dense = tf.function(lambda x, fine=fine: model.dense(x, fine_stride=fine))
        logits, _, windows = dense(image)
        logits, windows = logits.numpy()[0], windows.numpy()
        rows, cols = logits.shape[:2]
        boxes = windows.reshape(-1, 4).astype(int)
        if boxes[:, 2].max() > size or boxes[:, 3].max() > size:
            raise RuntimeError(f"a window of the dense map lies outside the {size} px image")
        crops = np.stack([pixels[y1:y2, x1:x2] for x1, y1, x2, y2 in boxes])
        chunks = [tf.constant(crops[i:i + args.chunk]) for i in range(0, len(crops), args.chunk)]

        def one_by_one():
            return [window_net(chunk) for chunk in chunks]

        dense_seconds = median_seconds(lambda: dense(image)[0].numpy(), args.repeats)
        window_seconds = median_seconds(lambda: [c[0].numpy() for c in one_by_one()], args.repeats)
        crop_logits = np.concatenate([c[0].numpy() for c in one_by_one()]).reshape(rows, cols, -1)
        diff = np.abs(crop_logits - logits)
        # the windows whose crop at window size lies away from the image border
        interior = np.zeros((rows, cols), bool)
        stride = fs if fine else fs * model.pool
        ys, xs = np.arange(rows) * stride, np.arange(cols) * stride
        interior[np.ix_((ys >= margin) & (ys + w + margin <= size),
                        (xs >= margin) & (xs + w + margin <= size))] = True
        row = {"stride": stride, "map": [rows, cols], "windows": int(rows * cols),
               "dense_seconds": round(dense_seconds, 4),
               "window_by_window_seconds": round(window_seconds, 4),
               "ratio_window_by_window_over_dense": round(window_seconds / dense_seconds, 2),
               "window_crop_vs_dense_max_abs_logit_diff": float(diff.max()),
               "window_crop_vs_dense_median_abs_logit_diff": float(np.median(diff))}
        # Exactness with context: a few interior windows, spread over the map and, at the fine
        # stride, over the pooling offsets (u mod p, v mod p).
        picks = np.argwhere(interior)
        if len(picks):
            # a window of every pooling offset (all p^2 at the fine stride), topped up with
            # windows spread over the map
            offset = ((picks[:, 0] % model.pool) * model.pool + picks[:, 1] % model.pool if fine
                      else np.zeros(len(picks), int))
            chosen = [int(np.flatnonzero(offset == o)[0]) for o in np.unique(offset)]
            spread = np.linspace(0, len(picks) - 1, args.check_windows).astype(int).tolist()
            chosen += [i for i in spread if i not in chosen][:max(0, args.check_windows - len(chosen))]
            picks = picks[sorted(chosen)]
            halo = np.stack([pixels[u * stride - margin:u * stride + w + margin,
                                    v * stride - margin:v * stride + w + margin] for u, v in picks])
            exact = context_net(tf.constant(halo)).numpy()[:, 0, 0]
            halo_diff = float(np.abs(exact - logits[picks[:, 0], picks[:, 1]]).max())
            row["halo_check"] = {"windows": [[int(u), int(v)] for u, v in picks], "margin_px": margin,
                                 "offsets": sorted({(int(u) % model.pool, int(v) % model.pool)
                                                    for u, v in picks}) if fine else [[0, 0]],
                                 "max_abs_logit_diff": halo_diff}
            if not halo_diff < 1e-3:
                raise AssertionError(f"{size} px, {'fine' if fine else 'coarse'} stride: a window "
                                     f"evaluated alone differs from the dense map by {halo_diff}")
        else:
            row["halo_check"] = f"no window has {margin} px of context inside a {size} px image"
        result["fine" if fine else "coarse"] = row
        log(f"{size} px {'fine' if fine else 'coarse'}: {json.dumps(row)}")

    # Multi-scale dense evaluation (classification as section 3.3, without flips) per image.
    per_window = result["fine"]["window_by_window_seconds"] / result["fine"]["windows"]
    multi = {}
    for name, scales in (("fine_1_scale", model.protocol("fine_1_scale")["scales"]),
                         ("fine_scale_1.0", (1.0,)),
                         ("fine_6_scales", model.protocol("fine_6_scales")["scales"])):
        run = tf.function(lambda x, scales=scales: model.classify(x, scales=scales, flips=False,
                                                                  fine_stride=True))
        seconds = median_seconds(lambda: run(image).numpy(), args.repeats)
        count = 0
        for s in scales:
            scaled = tf.image.resize(image, [max(int(round(size * s)), w + (model.pool - 1) * fs)] * 2)
            count += int(np.prod(model.dense(scaled, fine_stride=True)[0].shape[1:3]))
        multi[name] = {"scales": list(scales), "windows": count, "dense_seconds": round(seconds, 4),
                       "window_by_window_estimate_seconds": round(count * per_window, 3)}
    multi["six_over_one_scale_1.0"] = round(multi["fine_6_scales"]["dense_seconds"] /
                                           multi["fine_scale_1.0"]["dense_seconds"], 2)
    result["multi_scale"] = multi
    log(f"{size} px multi-scale: {json.dumps(multi)}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", choices=("shipped", "train"), default=None,
                        help="default: shipped when the zoo has trained weights, else train")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--work", default=os.path.join("out", "overfeat_benchmark"), help="data and run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="128,256", help="square image sizes of the speed part")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="windows per call, window by window")
    parser.add_argument("--check-windows", type=int, default=12, help="windows of the halo check")
    parser.add_argument("--protocols", default="coarse_1_scale,fine_1_scale,fine_4_scales,fine_6_scales",
                        help="table-2 rows to evaluate ('' skips the accuracy part)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from kerasdet import engine, zoo
    from kerasdet.data.data_spec import SYNTHETIC_SETS, parse_data_spec
    from kerasdet.evaluation.localization import evaluate_localization

    info = zoo.info(ENTRY)
    if args.weights is None:
        args.weights = "shipped" if info["status"] == "trained weights" else "train"
    if args.weights == "shipped" and info["status"] != "trained weights":
        raise SystemExit(f"--weights shipped: {ENTRY} has no shipped weights ({info['status']}); "
                         f"use --weights train")
    entry = zoo.registry.get_entry(ENTRY)
    kind, _ = SYNTHETIC_SETS[entry.dataset]
    data = parse_data_spec(f"{kind}:" + os.path.join(args.work, entry.dataset))
    model, model_info = get_model(args, entry, data)
    recipe = engine.TrainingRecipe(entry.recipe)
    val_ds = engine.make_pipeline(data.val, entry.input, recipe["batch_size"], False)

    report = {"benchmark": "overfeat",
              "machine": {"cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
                          "python": platform.python_version(),
                          "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
              "model": dict(model_info, window_px=model.window, feature_stride=model.feature_stride,
                            pool=model.pool, scales=list(model.scales), flips=model.flips),
              "protocols": {}, "speed": {}}
    for name in [n for n in args.protocols.split(",") if n]:
        protocol = model.protocol(name)
        start = time.perf_counter()
        metrics = evaluate_localization(model, val_ds, **protocol)
        row = {"scales": list(protocol["scales"]), "fine_stride": protocol["fine_stride"],
               "images": metrics["images"], "top1": round(metrics["top1"], 4),
               "localization_top1": round(metrics["localization_top1"], 4),
               "mean_iou": round(metrics["mean_iou"], 4),
               "eval_seconds": round(time.perf_counter() - start, 2)}
        report["protocols"][name] = row
        log(f"{name}: {json.dumps(row)}")

    batch = next(iter(val_ds))
    info_row = batch["image_info"][0].numpy()
    first = batch["images"][0, :int(round(info_row[4])), :int(round(info_row[5]))]
    for size in [int(s) for s in args.sizes.split(",") if s]:
        report["speed"][f"{size}x{size}"] = speed_for_size(model, first, size, args)
    report["speed"]["notes"] = (
        "window_by_window runs the network on each window crop (cropping excluded from the time); "
        "its outputs differ from the dense map's by the zero padding a lone window sees at its "
        "border (window_crop_vs_dense_*); halo_check evaluates windows with margin_px of context "
        "and matches the dense map, at the coarse stride and at every fine-stride offset it "
        "samples. multi_scale: model.classify without flips; window_by_window_estimate = windows "
        "x the measured per-window time at this size.")
    report["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
