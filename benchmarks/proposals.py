#!/usr/bin/env python
"""Recall and speed of the region proposals of kerasdet.data.proposals (issue 16). One JSON report on
stdout (progress on stderr), also written to `--out` when given.

    python benchmarks/proposals.py [--work DIR] [--images 32] [--quality-images 4]
                                   [--photos 8] [--out proposals.json]

Data:
  synthetic   the first `--images` of kerasdet's synthetic validation set (the `synthetic:DIR` spec:
              128 x 128, 3 shapes, seed 2), written to `--work` if missing.
  photos      `--photos` held-out tiles (128 x 128) of scikit-image's coins photo
              (kerasdet.data.sample_photos), when scikit-image is installed.

Methods, each written through write_proposal_cache (so the time per image is the cache writer's,
reading the PNG included) and scored with proposal_recall at IoU 0.5 / 0.7:
  selective_search_fast      R-CNN's fast mode, at most 2000 boxes, on every image;
  selective_search_quality   the quality mode on the first `--quality-images` (it is ~4x slower);
  edge_boxes_gradient        EdgeBoxes on the model-free gradient edges (no model.yml.gz here),
                             at most 2000 boxes.
Also recall of the first 100 / 300 boxes of each (top_k), for the ranking.
whole_photos: seconds and box count of selective search (fast) and EdgeBoxes on three whole
  scikit-image photos (coins 303x384, astronaut 512x512, chelsea 300x451): speed at sizes nearer
  VOC's (~500 x 375), no ground truth.
Duration: about 30 s on 2 shared CPU cores.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time


def _measure(dataset, path, method, **kwargs):
    from kerasdet.data.proposals import proposal_recall, write_proposal_cache

    start = time.perf_counter()
    cache = write_proposal_cache(dataset, path, method, progress=False, resume=False, **kwargs)
    wall = time.perf_counter() - start
    result = proposal_recall(dataset, cache)
    result.update(method=method, settings=kwargs, images=len(dataset.records),
                  seconds_per_image=cache.metadata["seconds_per_image"],
                  wall_seconds=round(wall, 2))
    for k in (100, 300):
        result[f"recall_top{k}"] = proposal_recall(dataset, cache, top_k=k)["recall"]
    print(f"{method} {kwargs}: {result['recall']} {result['mean_proposals']:.0f} boxes, "
          f"{result['seconds_per_image']} s/image", file=sys.stderr, flush=True)
    return result


def _suite(dataset, work, name, quality_images):
    rows = {"selective_search_fast": _measure(dataset, os.path.join(work, f"{name}_ss_fast.npz"),
                                              "selective_search", mode="fast")}
    if quality_images:
        few = dataset.subset(range(min(quality_images, len(dataset.records))))
        rows["selective_search_fast_same_images"] = _measure(
            few, os.path.join(work, f"{name}_ss_fast_few.npz"), "selective_search", mode="fast")
        rows["selective_search_quality"] = _measure(few, os.path.join(work, f"{name}_ss_quality.npz"),
                                                    "selective_search", mode="quality")
    rows["edge_boxes_gradient"] = _measure(dataset, os.path.join(work, f"{name}_eb.npz"), "edge_boxes")
    return rows


def _whole_photos():
    """Seconds and box count of selective search (fast) and EdgeBoxes on whole scikit-image photos
    (no boxes to score against: speed at a realistic size only)."""
    try:
        import skimage.data
    except ImportError as error:
        return f"skipped: {error}"
    from kerasdet.data.proposals import edge_boxes, selective_search

    rows = {}
    for name in ("coins", "astronaut", "chelsea"):
        image = getattr(skimage.data, name)()
        row = {"height": int(image.shape[0]), "width": int(image.shape[1])}
        for label, fn in (("selective_search_fast", selective_search), ("edge_boxes_gradient", edge_boxes)):
            start = time.perf_counter()
            boxes = fn(image, max_proposals=2000)
            row[label] = {"seconds": round(time.perf_counter() - start, 3), "boxes": int(len(boxes))}
        print(f"{name}: {row}", file=sys.stderr, flush=True)
        rows[name] = row
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "kerasdet_proposals_bench"))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--quality-images", type=int, default=4)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import cv2

    from kerasdet.data.data_spec import parse_data_spec

    os.makedirs(args.work, exist_ok=True)
    data = parse_data_spec(f"synthetic:{os.path.join(args.work, 'synthetic')}", need_train=False)
    synthetic = data.val.subset(range(min(args.images, len(data.val.records))))
    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "opencv": cv2.__version__, "opencv_threads": cv2.getNumThreads(),
                          "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                          "note": "2 CPU cores shared with other jobs: times are indicative"},
              "synthetic": _suite(synthetic, args.work, "synthetic", args.quality_images)}
    try:
        from kerasdet.data.sample_photos import make_sample_photos

        _, held_out = make_sample_photos(os.path.join(args.work, "photos"), ("coins",))
        photos = held_out.subset(range(min(args.photos, len(held_out.records))))
        report["coins_photos"] = _suite(photos, args.work, "coins", args.quality_images)
    except ImportError as error:  # scikit-image missing
        report["coins_photos"] = f"skipped: {error}"
    report["whole_photos"] = _whole_photos()
    report["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
