"""Trains a small synthetic zoo entry from scratch (seeded) and publishes it into the zoo.

    python train/make_shipped_weights.py [--entry faster_rcnn_tiny_fpn_synthetic] [--work DIR]

Writes zoo/weights/<entry>.weights.h5 and records its sha256, the measured metrics on the held-out
synthetic validation images and this exact command in the entry's zoo file. It runs the same
code as `kerasdet train` (kerasdet.engine).
"""
import argparse
import json
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", default="faster_rcnn_tiny_fpn_synthetic")
    parser.add_argument("--work", default=os.path.join("out", "shipped_weights"), help="data and run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    args = parser.parse_args(argv)

    import keras

    from kerasdet import zoo
    from kerasdet import engine
    from kerasdet.data.data_spec import SYNTHETIC_SETS, parse_data_spec

    entry = zoo.registry.get_entry(args.entry)
    if entry.dataset not in SYNTHETIC_SETS:
        raise SystemExit(f"{args.entry} is not a synthetic entry (its data set is {entry.dataset!r}; "
                         f"synthetic ones are {sorted(SYNTHETIC_SETS)})")
    kind, settings = SYNTHETIC_SETS[entry.dataset]
    keras.utils.set_random_seed(args.seed)
    data = parse_data_spec(f"{kind}:" + os.path.join(args.work, entry.dataset))
    model = zoo.build(args.entry)
    recipe = engine.TrainingRecipe(entry.recipe, epochs=args.epochs)
    # Detectors on external proposals (R-CNN, SPP-net): the recipe names the proposal method; the
    # caches are computed once per split in the work folder.
    proposal_spec = entry.recipe.get("proposals")
    caches = {"train": None, "val": None}
    extra = {}
    if proposal_spec:
        from kerasdet.data.proposals import write_proposal_cache

        settings_kw = {k: v for k, v in proposal_spec.items() if k not in ("method",)}
        for split, records in (("train", data.train), ("val", data.val)):
            caches[split] = os.path.join(args.work, entry.dataset, f"proposals_{split}.npz")
            if not os.path.isfile(caches[split]):
                write_proposal_cache(records, caches[split], method=proposal_spec["method"], **settings_kw)
        extra = {"max_proposals": proposal_spec["max_proposals"]}
    train_ds = engine.make_pipeline(data.train, entry.input, recipe["batch_size"], True,
                                      seed=args.seed, proposals=caches["train"], **extra)
    val_ds = engine.make_pipeline(data.val, entry.input, recipe["batch_size"], False,
                                  proposals=caches["val"], **extra)
    start = time.perf_counter()
    run = engine.train_model(model, train_ds, os.path.join(args.work, "run"), recipe, verbose=2)
    if run["stopped_on_nan"]:
        raise SystemExit(run["message"])
    if hasattr(model, "fit_region_stages"):  # R-CNN / SPP-net: SVMs and box regressors
        model.fit_region_stages(engine.make_pipeline(data.train, entry.input, recipe["batch_size"], False,
                                                     proposals=caches["train"], **extra))
    seconds = time.perf_counter() - start
    summary = engine.evaluate_detector(model, val_ds, data.class_names,
                                         os.path.join(args.work, "run"), records=data.val)
    localization = None
    if settings.get("max_objects") == 1:
        from kerasdet.evaluation.localization import evaluate_localization

        localization = evaluate_localization(model, val_ds)

    zoo_folder = os.path.dirname(entry.source_file)
    file_name = f"{args.entry}.weights.h5"
    target = os.path.join(zoo_folder, "weights", file_name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # A fresh model holds the same layers without the optimizer's slots: half the file size.
    shipped = zoo.build(args.entry)
    shipped.set_weights(model.get_weights())
    shipped.save_weights(target)
    with open(entry.source_file, encoding="utf-8") as handle:
        document = json.load(handle)
    record = document["entries"][args.entry]
    record["weights"] = {"url": f"weights/{file_name}", "file": file_name,
                         "sha256": zoo.sha256_of(target), "size_bytes": os.path.getsize(target)}
    record["metrics"] = {
        "voc_map50": round(summary["voc_map50"], 4), "coco_ap": round(summary["coco_ap"], 4),
        "coco_ap50": round(summary["coco_ap50"], 4),
        "evaluated_on": (f"{settings['val_images']} held-out synthetic images "
                         f"(seed {settings['val_seed']}, {settings['image_size']})"),
        "trained_on": (f"{settings['train_images']} synthetic images "
                       f"(seed {settings['train_seed']}), {recipe['epochs']} epochs, "
                       f"{seconds:.0f} s on 2 CPU cores"),
        "training_seed": args.seed,
        # What tests/test_zoo.py regenerates to re-measure the metrics.
        "data": {"generator": "kerasdet.data.synthetic.make_dataset", **settings},
    }
    if proposal_spec:
        record["metrics"]["data"]["proposals"] = dict(proposal_spec)
    if localization is not None:
        record["metrics"]["localization"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                             for k, v in localization.items()}
    # --work only chooses a scratch folder, so it is left out of the recorded command.
    record["command"] = (f"python train/make_shipped_weights.py --entry {args.entry} --seed {args.seed}"
                         + (f" --epochs {args.epochs}" if args.epochs else ""))
    with open(entry.source_file, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
    print(f"wrote {target} ({os.path.getsize(target)} bytes) and updated {entry.source_file}: "
          f"{record['metrics']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
