"""Evaluation in the original image's pixels: a COCO-format set whose images the pipeline resizes,
scored by evaluate_model and by pycocotools' own loadRes on a results JSON written by the test."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kerasdet.data.coco import load_coco
from kerasdet.data.pipeline import build_dataset
from kerasdet.evaluation import (COCO_METRIC_NAMES, EvaluationCallback, coco_evaluate, evaluate_model,
                                 voc_evaluate)

# (height, width) of the three images: the pipeline letterboxes them into 64 x 64, i.e. scales of
# 0.32, 0.267 and 0.427, so none of the objects below keeps its COCO size range in network pixels.
SIZES = {11: (160, 200), 12: (240, 120), 13: (150, 90)}
CATEGORIES = {3: "cat", 7: "dog"}  # non-contiguous ids: class 0 -> 3, class 1 -> 7
# image id: [(category id, x, y, w, h, iscrowd, area or None = box area)]
OBJECTS = {
    11: [(3, 10, 12, 14, 16, 0, None),        # small (224)
         (3, 40, 30, 60, 45, 0, None),        # medium (2700)
         (7, 95, 20, 100, 130, 0, None),      # large (13000)
         (7, 10, 70, 60, 80, 1, None)],       # crowd region
    12: [(7, 5, 5, 100, 110, 0, None),        # large
         (3, 20, 150, 40, 40, 0, 900.0),      # box 1600 (medium) but the file's area is 900 (small)
         (3, 70, 200, 22, 25, 0, None)],      # small
    13: [(7, 10, 10, 70, 90, 0, None),        # medium (6300)
         (3, 5, 110, 30, 35, 0, None)],       # medium (1050)
}


def _box_mask(x1, y1, x2, y2, height, width):
    # The pixels whose centers lie in the box: what an all-ones mask grid pasted into it covers.
    rows = (np.arange(height) + 0.5 >= y1) & (np.arange(height) + 0.5 < y2)
    cols = (np.arange(width) + 0.5 >= x1) & (np.arange(width) + 0.5 < x2)
    return (rows[:, None] & cols[None, :]).astype(np.uint8)


def _write_set(root):
    (root / "images").mkdir()
    images, annotations = [], []
    for image_id, (h, w) in SIZES.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for cat, x, y, bw, bh, crowd, area in OBJECTS[image_id]:
            polygon = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, bw, bh], "iscrowd": crowd,
                                "area": area if area is not None else float(bw * bh),
                                "segmentation": [polygon]})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in CATEGORIES.items()]}
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


def _detections():
    """Per image id: boxes [K, 4] (original pixels), scores, class indices: jittered copies of the
    objects (spread over the IoU thresholds), a false positive, and a detection inside the crowd."""
    rng = np.random.default_rng(0)
    out = {}
    for image_id, (h, w) in SIZES.items():
        boxes, scores, classes = [], [], []
        for cat, x, y, bw, bh, crowd, _ in OBJECTS[image_id]:
            box = np.array([x, y, x + bw, y + bh], np.float64)
            if crowd:
                box = np.array([x + 5.3, y + 8.1, x + 35.7, y + 40.2])
            else:
                box = box + rng.uniform(-0.22, 0.22, 4) * np.array([bw, bh, bw, bh])
            boxes.append(np.clip(box, 0, [w, h, w, h]))
            scores.append(rng.uniform(0.3, 1.0))
            classes.append(0 if cat == 3 else 1)
        # Off the half-pixel grid, so no pixel center sits on its edge.
        boxes.append([w * 0.41 + 0.17, h * 0.37 + 0.13, w * 0.63 + 0.11, h * 0.71 + 0.19])
        scores.append(rng.uniform(0.3, 1.0))
        classes.append(int(rng.integers(2)))
        out[image_id] = (np.array(boxes), np.array(scores), np.array(classes))
    return out


def _stub(detections, records, grid=None):
    """predict_fn: the known detections, moved into network-input pixels with the batch's scale."""
    def predict(model, batch):
        info, index = batch["image_info"].numpy(), batch["image_index"].numpy()
        k = max(len(s) for _, s, _ in detections.values())
        out = {"boxes": np.zeros((len(index), k, 4), np.float32), "scores": np.zeros((len(index), k)),
               "classes": np.full((len(index), k), -1), "num_detections": np.zeros(len(index), int)}
        if grid is not None:
            out["masks"] = np.zeros((len(index), k, grid, grid), np.float32)
        for b, i in enumerate(index):
            boxes, scores, classes = detections[records[int(i)].image_id]
            n = len(scores)
            scale = np.array([info[b, 3], info[b, 2], info[b, 3], info[b, 2]], np.float64)
            out["boxes"][b, :n] = boxes * scale
            out["scores"][b, :n], out["classes"][b, :n], out["num_detections"][b] = scores, classes, n
            if grid is not None:
                out["masks"][b, :n] = 1.0
        return out
    return predict


def _reference_results(detections, with_masks=False):
    """The COCO results list written by hand from the original-frame detections."""
    results = []
    for image_id, (boxes, scores, classes) in detections.items():
        h, w = SIZES[image_id]
        for box, score, cls in zip(boxes, scores, classes):
            entry = {"image_id": image_id, "category_id": [3, 7][cls], "score": float(score),
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
            if with_masks:
                rle = mask_utils.encode(np.asfortranarray(_box_mask(*box, h, w)))
                entry = {k: v for k, v in entry.items() if k != "bbox"}
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            results.append(entry)
    return results


def _pycocotools(ann_path, results_path, iou_type, image_ids):
    gt = COCO(ann_path)
    evaluator = COCOeval(gt, gt.loadRes(results_path), iou_type)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.where(evaluator.stats > -1, evaluator.stats, np.nan)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_frame")
    ann_path = _write_set(root)
    records = load_coco(ann_path, str(root / "images"))
    dataset = build_dataset(records, batch_size=2, image_size=(64, 64))
    return ann_path, records, dataset


def test_coco_numbers_equal_pycocotools_on_the_original_file(coco_set, tmp_path):
    ann_path, records, dataset = coco_set
    detections = _detections()
    out = tmp_path / "detections_val.json"
    results = evaluate_model(None, dataset, metrics=("voc", "coco"), records=records,
                             predict_fn=_stub(detections, records), detections_file=out)
    reference_path = tmp_path / "reference.json"
    reference_path.write_text(json.dumps(_reference_results(detections)))
    expected = _pycocotools(ann_path, str(reference_path), "bbox", SIZES)
    got = np.array([results["coco"]["bbox"][name] for name in COCO_METRIC_NAMES])
    np.testing.assert_array_equal(got, expected)
    # Every size range has objects, and the numbers are not trivially 0 or 1.
    assert np.all(np.isfinite(expected)) and 0.1 < expected[0] < 0.9
    # The written file is the reference list, in the original frame, with the file's category ids.
    written = json.loads(out.read_text())
    reference = json.loads(reference_path.read_text())
    key = lambda e: (e["image_id"], e["score"])  # noqa: E731
    written, reference = sorted(written, key=key), sorted(reference, key=key)
    assert [(e["image_id"], e["category_id"]) for e in written] == \
        [(e["image_id"], e["category_id"]) for e in reference]
    np.testing.assert_allclose([e["bbox"] for e in written], [e["bbox"] for e in reference], atol=1e-3)
    np.testing.assert_allclose([e["score"] for e in written], [e["score"] for e in reference], rtol=1e-6)
    # Only the evaluated images count: the first batch holds two of the three.
    first = evaluate_model(None, dataset, metrics="coco", records=records, max_batches=1,
                           predict_fn=_stub(detections, records))
    seen = [records[i].image_id for i in range(2)]
    expected = _pycocotools(ann_path, str(reference_path), "bbox", seen)
    np.testing.assert_array_equal([first["coco"]["bbox"][n] for n in COCO_METRIC_NAMES], expected)


def test_mask_numbers_equal_pycocotools_with_grids_pasted_at_original_size(coco_set, tmp_path):
    ann_path, records, dataset = coco_set
    detections = _detections()
    out = tmp_path / "detections_val.json"
    results = evaluate_model(None, dataset, metrics="coco", records=records, detections_file=out,
                             predict_fn=_stub(detections, records, grid=7))
    assert set(results["coco"]) == {"bbox", "segm"}
    reference_path = tmp_path / "reference.json"
    reference_path.write_text(json.dumps(_reference_results(detections, with_masks=True)))
    expected = _pycocotools(ann_path, str(reference_path), "segm", SIZES)
    np.testing.assert_array_equal([results["coco"]["segm"][n] for n in COCO_METRIC_NAMES], expected)
    sizes = {e["image_id"]: e["segmentation"]["size"] for e in json.loads(out.read_text())}
    assert sizes == {i: list(s) for i, s in SIZES.items()}


def _original_ground_truths(records):
    return [{"boxes": r.boxes, "classes": r.labels, "iscrowd": r.iscrowd} for r in records]


def test_voc_numbers_are_those_of_the_original_boxes(coco_set):
    _, records, dataset = coco_set
    detections = _detections()
    dets = [dict(zip(("boxes", "scores", "classes"), detections[r.image_id])) for r in records]
    direct = voc_evaluate(dets, _original_ground_truths(records), class_names=records.class_names)
    results = evaluate_model(None, dataset, metrics="voc", records=records,
                             predict_fn=_stub(detections, records))
    assert results["voc"]["mAP"] == pytest.approx(direct["mAP"], abs=1e-12)
    assert results["voc"]["AP"] == pytest.approx(direct["AP"], abs=1e-12)
    assert 0.1 < direct["mAP"] < 0.95


def test_batch_ground_truth_is_mapped_back_too(coco_set):
    # Without records the batch's boxes are the ground truth; mapped back with image_info they give
    # the numbers of the original boxes (in-memory COCO ground truth: box areas, batch crowd flags).
    _, records, dataset = coco_set
    detections = _detections()
    dets = [dict(zip(("boxes", "scores", "classes"), detections[r.image_id])) for r in records]
    gts = _original_ground_truths(records)
    results = evaluate_model(None, dataset, predict_fn=_stub(detections, records))
    direct_coco = coco_evaluate(dets, gts)["bbox"]
    got = [results["coco"]["bbox"][n] for n in COCO_METRIC_NAMES]
    np.testing.assert_allclose(got, [direct_coco[n] for n in COCO_METRIC_NAMES], atol=1e-12)
    assert np.isfinite(direct_coco["APl"]) and np.isfinite(direct_coco["APm"])
    direct_voc = voc_evaluate(dets, gts)
    assert results["voc"]["mAP"] == pytest.approx(direct_voc["mAP"], abs=1e-12)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode
@pytest.mark.parametrize("gt_format", ["grid", "canvas"])
def test_batch_masks_grids_or_canvas_are_pasted_at_original_size(tmp_path, gt_format):
    # One 100 x 80 image at scale 0.5 (50 x 40 in a 64 x 64 canvas); the object covers x 10..50,
    # y 10..70 in the original, 5..25 x 5..35 in the network input.
    box = np.array([[5.0, 5.0, 25.0, 35.0]], np.float32)
    if gt_format == "grid":
        gt_masks = np.ones((1, 1, 8, 8), np.uint8)
    else:
        gt_masks = np.zeros((1, 1, 64, 64), np.uint8)
        gt_masks[0, 0, 5:35, 5:25] = 1
    batch = {"images": np.zeros((1, 64, 64, 3), np.float32),
             "bounding_boxes": {"boxes": box[None], "labels": np.zeros((1, 1), np.int32)},
             "masks": gt_masks,
             "image_info": np.array([[100, 80, 0.5, 0.5, 50, 40]], np.float32)}
    dataset = tf.data.Dataset.from_tensors(batch)

    def predict(model, batch):
        return {"boxes": box[None], "scores": np.array([[0.9]]), "classes": np.array([[0]]),
                "num_detections": np.array([1]), "masks": np.ones((1, 1, 6, 6), np.float32)}

    out = tmp_path / "detections.json"
    results = evaluate_model(None, dataset, metrics="coco", predict_fn=predict, detections_file=out)
    assert results["coco"]["segm"]["AP"] == pytest.approx(1.0)
    (entry,) = json.loads(out.read_text())
    assert entry["bbox"] == pytest.approx([10, 10, 40, 60])
    assert entry["segmentation"]["size"] == [100, 80]
    mask = mask_utils.decode({"size": [100, 80], "counts": entry["segmentation"]["counts"].encode()})
    np.testing.assert_array_equal(mask, _box_mask(10, 10, 50, 70, 100, 80))


def test_records_must_match_the_batches(coco_set):
    _, records, dataset = coco_set
    detections = _detections()
    stub = _stub(detections, records)
    with pytest.raises(TypeError, match="records must be the kerasdet DetectionDataset"):
        evaluate_model(None, dataset, records=list(records), predict_fn=stub)
    shuffled = records.subset([2, 1, 0])  # another order: image_index now names other images
    with pytest.raises(ValueError, match=r"names record 13 .* of size 150x90, but the batch's "
                                         r"image_info says 160x200"):
        evaluate_model(None, dataset, records=shuffled, predict_fn=stub)
    no_index = dataset.map(lambda b: {k: v for k, v in b.items() if k != "image_index"})
    with pytest.raises(ValueError, match="needs the batch entries 'image_info' and 'image_index'"):
        evaluate_model(None, no_index, records=records, predict_fn=lambda m, b: stub(m, dict(
            b, image_index=tf.range(tf.shape(b["images"])[0]))))
    assert shuffled.annotation_file == records.annotation_file


def test_callback_scores_against_the_records(coco_set, tmp_path):
    ann_path, records, dataset = coco_set
    detections = _detections()
    callback = EvaluationCallback(dataset, records=records, predict_fn=_stub(detections, records),
                                  print_table=False)
    callback.set_model(keras.Sequential())
    logs = {}
    callback.on_epoch_end(0, logs)
    reference_path = tmp_path / "reference.json"
    reference_path.write_text(json.dumps(_reference_results(detections)))
    expected = _pycocotools(ann_path, str(reference_path), "bbox", SIZES)
    assert [logs[f"val_coco_{n.lower()}"] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == \
        expected[:6].tolist()
