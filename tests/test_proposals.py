"""Region proposals (issue 16): selective search / EdgeBoxes through cv2.ximgproc, the proposal cache,
its recall, the pipeline's `proposals` entry and Fast R-CNN trained on cached proposals."""
import json
import sys
import types

import numpy as np
import pytest

pytest.importorskip("cv2.ximgproc", reason="needs kerasdet[proposals] (opencv-contrib-python-headless)")

from kerasdet.data import proposals as P  # noqa: E402
from kerasdet.data.pipeline import build_dataset  # noqa: E402

# Measured on the 6 images below (64x64, 12..32 px shapes): selective search fast mode recalls
# 1.0 of the 16 objects at IoU 0.5 and at 0.7 (77 boxes per image); the floors leave room for
# OpenCV versions that rank or segment a little differently.
RECALL_FLOOR = {"0.5": 0.85, "0.7": 0.6}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kerasdet.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("proposals")
    data = make_dataset(str(root / "val"), 6, seed=2, image_size=(64, 64), split="val",
                        object_size=(12, 32))
    cache = P.write_proposal_cache(data, str(root / "ss_val.npz"), progress=False)
    return {"root": root, "data": data, "cache": cache,
            "spec": f"coco:{root}/{{split}}/annotations/instances_{{split}}.json:{root}/{{split}}/images"}


def _write_cache(path, ids, paths, chunks, metadata=None):
    P._save_npz(str(path), ids, paths, [np.asarray(c, np.float32).reshape(-1, 4) for c in chunks],
                metadata or {"method": "test"})
    return P.ProposalCache(str(path))


def test_selective_search_boxes_lie_inside_the_image(tiny):
    data = tiny["data"]
    record = data.records[0]
    boxes = P.selective_search(data.image_file(record), max_proposals=2000)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 10
    assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= record.width)
    assert np.all(boxes[:, 3] <= record.height)
    assert np.all(boxes[:, 2:] - boxes[:, :2] >= 1)
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    assert len(P.selective_search(data.image_file(record), max_proposals=5)) == 5


def test_clean_boxes_converts_clips_drops_and_keeps_the_ranking():
    xywh = [[5, 5, 10, 10], [0, 0, 0, 4], [5, 5, 10, 10], [60, 1, 20, 3], [1, 2, 3, 4]]
    boxes = P.clean_boxes(xywh, height=32, width=64)
    np.testing.assert_array_equal(boxes, [[5, 5, 15, 15], [60, 1, 64, 4], [1, 2, 4, 6]])


def test_selective_search_recall_on_the_synthetic_images(tiny):
    result = P.proposal_recall(tiny["data"], tiny["cache"])
    print("selective search fast, 6 synthetic 64x64 images:", result)
    assert result["num_objects"] == sum(r.num_objects for r in tiny["data"].records)
    for t, floor in RECALL_FLOOR.items():
        assert result["recall"][t] >= floor
    top1 = P.proposal_recall(tiny["data"], tiny["cache"], top_k=1)
    assert top1["mean_proposals"] == 1 and top1["recall"]["0.5"] <= result["recall"]["0.5"]


def test_edge_boxes_without_the_model_uses_gradient_edges(tiny):
    data = tiny["data"]
    record = data.records[0]
    boxes = P.edge_boxes(data.image_file(record), max_proposals=100)
    assert boxes.dtype == np.float32 and 0 < len(boxes) <= 100
    assert np.all(boxes[:, 2] <= record.width) and np.all(boxes[:, 3] <= record.height)
    with pytest.raises(ValueError, match="model.yml.gz"):
        P.edge_boxes(data.image_file(record), edges="structured")
    with pytest.raises(FileNotFoundError, match="nowhere.yml.gz"):
        P.edge_boxes(data.image_file(record), model_path="nowhere.yml.gz")


def test_cache_round_trip_and_metadata(tiny, tmp_path):
    data, cache = tiny["data"], tiny["cache"]
    assert len(cache) == len(data.records)
    for record in data.records:
        direct = P.selective_search(data.image_file(record))
        np.testing.assert_array_equal(cache.get(record.image_id), direct)
    meta = cache.metadata
    assert meta["method"] == "selective_search" and meta["count"] == 6 and meta["complete"]
    assert meta["kerasdet_version"] and meta["seconds_per_image"] > 0
    again = P.load_proposal_cache(cache.path)
    np.testing.assert_array_equal(again.boxes, cache.boxes)
    assert not list(tiny["root"].glob("*.tmp")) and not list(tiny["root"].glob("*.partial.npz"))


def test_writing_resumes_from_a_partial_file(tiny, tmp_path, monkeypatch):
    data = tiny["data"]
    out = tmp_path / "resumed.npz"
    calls = []
    real = P.compute_proposals

    def interrupted(image, method, **kw):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(image)
        return real(image, method, **kw)

    monkeypatch.setattr(P, "compute_proposals", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.write_proposal_cache(data, str(out), progress=False, save_every=2)
    assert not out.exists() and (tmp_path / "resumed.npz.partial.npz").exists()
    calls.clear()
    monkeypatch.setattr(P, "compute_proposals", real)
    cache = P.write_proposal_cache(data, str(out), progress=False, save_every=2)
    assert cache.metadata["images_computed"] == 2  # four came from the partial file
    np.testing.assert_array_equal(cache.boxes, tiny["cache"].boxes)
    assert not (tmp_path / "resumed.npz.partial.npz").exists()


def test_missing_image_id_names_it_and_the_file(tiny, tmp_path):
    cache = tiny["cache"]
    with pytest.raises(KeyError, match="'no_such_image'.*ss_val.npz"):
        cache.get("no_such_image")
    first, second = tiny["data"].records[:2]
    partial = _write_cache(tmp_path / "partial.npz", [str(first.image_id)], [first.image_path],
                           [[[0, 0, 4, 4]]])
    with pytest.raises(KeyError, match=f"5 of 6 images.*partial.npz.*{second.image_id!r}"):
        build_dataset(tiny["data"], 2, image_size=(64, 64), proposals=partial)
    wrong = _write_cache(tmp_path / "other_split.npz", [str(r.image_id) for r in tiny["data"].records],
                         ["elsewhere.png"] * 6, [[[0, 0, 4, 4]]] * 6)
    with pytest.raises(ValueError, match="elsewhere.png"):
        build_dataset(tiny["data"], 2, image_size=(64, 64), proposals=wrong)


def test_corrupt_cache_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(P.ProposalCacheError, match="garbage.npz"):
        P.ProposalCache(str(garbage))
    nan = tmp_path / "nan.npz"
    _write_cache(tmp_path / "ok.npz", ["a"], ["a.png"], [[[0, 0, 4, 4]]])
    with np.load(tmp_path / "ok.npz") as ok:
        arrays = dict(ok)
    np.savez(nan, **dict(arrays, boxes=np.array([[0, 0, np.nan, 4]], np.float32)))
    with pytest.raises(P.ProposalCacheError, match="nan.npz.*non-finite"):
        P.ProposalCache(str(nan))
    flat = tmp_path / "flat.npz"
    np.savez(flat, **dict(arrays, boxes=np.zeros([1, 3], np.float32)))
    with pytest.raises(P.ProposalCacheError, match=r"flat.npz.*\[N, 4\]"):
        P.ProposalCache(str(flat))
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(P.ProposalCacheError, match="other.npz.*not a kerasdet proposal cache"):
        P.ProposalCache(str(other))
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        P.ProposalCache(str(tmp_path / "absent.npz"))


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 -> ImportError
    with pytest.raises(ImportError, match=r"kerasdet\[proposals\].*shadows"):
        P.selective_search(np.zeros([8, 8, 3], np.uint8))
    monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # plain opencv-python
    with pytest.raises(ImportError, match=r"no cv2.ximgproc.*opencv-contrib-python-headless"):
        P.edge_boxes(np.zeros([8, 8, 3], np.uint8))


def _reference(boxes, info_row, flipped, resized_w, resized_h):
    """numpy: original-pixel boxes -> input pixels (scale, optional flip, clip, drop empty)."""
    scale_y, scale_x = info_row[2], info_row[3]
    out = np.asarray(boxes, np.float64) * [scale_x, scale_y, scale_x, scale_y]
    if flipped:
        out = np.stack([resized_w - out[:, 2], out[:, 1], resized_w - out[:, 0], out[:, 3]], axis=1)
    out = np.clip(out, 0, [resized_w, resized_h, resized_w, resized_h])
    return out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]


def test_pipeline_moves_proposals_like_the_boxes(tiny, tmp_path):
    data = tiny["data"]
    rng = np.random.default_rng(0)
    chunks = []
    for record in data.records:
        # the ground truth itself, boxes crossing the border, a degenerate one, random ones
        extra = np.array([[-5, 3, 20, 30], [50, 50, 80, 70], [10, 10, 10, 30]], np.float32)
        corners = np.sort(rng.uniform(0, 64, [20, 2, 2]), axis=1).reshape(20, 4)[:, [0, 2, 1, 3]]
        chunks.append(np.concatenate([record.boxes, extra, corners.astype(np.float32)]))
    cache = _write_cache(tmp_path / "hand.npz", [str(r.image_id) for r in data.records],
                         [r.image_path for r in data.records], chunks)
    ds = build_dataset(data, 3, training=True, augment="flip", image_size=(48, 48), seed=4,
                       proposals=cache, max_proposals=40, shuffle=False)
    seen_flip = {False: 0, True: 0}
    for _ in range(3):
        for batch in ds:
            props = batch["proposals"].numpy()
            assert props.shape[1:] == (40, 4) and props.dtype == np.float32
            for b, index in enumerate(batch["image_index"].numpy()):
                record = data.records[index]
                info = batch["image_info"].numpy()[b]
                rh, rw = info[4], info[5]
                n = record.num_objects
                gt = batch["bounding_boxes"]["boxes"].numpy()[b, :n]
                flipped = not np.allclose(gt, _reference(record.boxes, info, False, rw, rh), atol=1e-4)
                np.testing.assert_allclose(gt, _reference(record.boxes, info, flipped, rw, rh), atol=1e-4)
                seen_flip[flipped] += 1
                expected = _reference(chunks[index], info, flipped, rw, rh)[:40]
                np.testing.assert_allclose(props[b, :len(expected)], expected, atol=1e-4)
                assert not props[b, len(expected):].any()
                # a proposal equal to a ground-truth box stays equal to it
                np.testing.assert_allclose(props[b, :n], gt, atol=1e-4)
    assert seen_flip[True] and seen_flip[False]
    evaluation = next(iter(build_dataset(data, 2, image_size=(48, 48), proposals=cache.path,
                                         max_proposals=3)))
    assert evaluation["proposals"].shape == (2, 3, 4)


def test_ground_truth_proposals_follow_expand_and_scale_jitter(tiny, tmp_path):
    # Proposals copied from the ground truth (and listed first) must come out equal to the boxes
    # after expand, flip, scale jitter and the crop to the canvas, which also drops the same rows.
    data = tiny["data"]
    chunks = [np.concatenate([r.boxes, [[0, 0, 64, 64]]]) for r in data.records]
    cache = _write_cache(tmp_path / "gt.npz", [str(r.image_id) for r in data.records],
                         [r.image_path for r in data.records], chunks)
    ds = build_dataset(data, 3, training=True, augment=("photometric", "expand", "flip"),
                       scale_jitter=(0.8, 2.0), image_size=(48, 48), seed=1, proposals=cache,
                       max_proposals=8)
    for _ in range(2):
        for batch in ds:
            labels = batch["bounding_boxes"]["labels"].numpy()
            for b in range(len(labels)):
                m = int((labels[b] >= 0).sum())
                gt = batch["bounding_boxes"]["boxes"].numpy()[b, :m]
                np.testing.assert_allclose(batch["proposals"].numpy()[b, :m], gt, atol=1e-4)


def test_pipeline_refuses_what_it_cannot_move(tiny):
    with pytest.raises(ValueError, match="crop"):
        build_dataset(tiny["data"], 2, training=True, augment="ssd", image_size=(64, 64),
                      proposals=tiny["cache"])
    with pytest.raises(ValueError, match="with_masks"):
        build_dataset(tiny["data"], 2, image_size=(64, 64), proposals=tiny["cache"], with_masks=True)


def test_fast_rcnn_trains_on_cached_proposals(tiny):
    import keras

    from kerasdet.models.fast_rcnn import FastRCNN

    model = FastRCNN(3, backbone="tiny", feature="C4", fc_dim=32, seed=0)
    ds = build_dataset(tiny["data"], 2, training=True, image_size=(64, 64), seed=0,
                       proposals=tiny["cache"], max_proposals=300)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    history = model.fit(ds.take(2), epochs=1, verbose=0)
    assert all(np.isfinite(v[-1]) for v in history.history.values())
    batch = next(iter(build_dataset(tiny["data"], 2, image_size=(64, 64), proposals=tiny["cache"],
                                    max_proposals=300)))
    out = model.predict_on_batch({k: batch[k] for k in model.predict_input_keys})
    assert np.all(np.isfinite(np.asarray(out["boxes"])))


def test_proposal_files_check_the_model():
    from kerasdet.engine.runs import proposal_files

    on_proposals = types.SimpleNamespace(name="fast", predict_input_keys=("images", "proposals"))
    own = types.SimpleNamespace(name="faster", predict_input_keys=("images", "image_info"))
    assert proposal_files("p_{split}.npz", on_proposals, ("train", "val"), "x") == {
        "train": "p_train.npz", "val": "p_val.npz"}
    assert proposal_files(None, own, ("val",), "x") == {"val": None}
    with pytest.raises(ValueError, match="fast works on external region proposals.*--proposals"):
        proposal_files(None, on_proposals, ("val",), "kerasdet evaluate")
    with pytest.raises(ValueError, match="faster does not take external proposals"):
        proposal_files("p.npz", own, ("val",), "kerasdet evaluate")


def test_cli_writes_one_cache_per_split_and_reports_recall(tiny, tmp_path, capsys):
    from kerasdet import cli

    out = tmp_path / "props.npz"
    status = cli.main(["proposals", "--data", tiny["spec"], "--split", "val", "--out", str(out),
                       "--max-proposals", "50", "--quiet"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    written = tmp_path / "props_val.npz"
    assert written.exists() and str(written) in printed
    assert "recall@0.5" in printed and "recall@0.7" in printed and "s per image" in printed
    cache = P.ProposalCache(str(written))
    assert len(cache) == 6 and cache.metadata["settings"]["max_proposals"] == 50
    assert max(len(cache.get(i)) for i in cache.ids) <= 50
    recall = float(printed.split("recall@0.5 ")[1].split()[0])
    assert recall >= RECALL_FLOOR["0.5"]
    status = cli.main(["proposals", "--data", tiny["spec"], "--split", "val", "--out",
                       str(tmp_path / "e_{split}.npz"), "--method", "edge_boxes", "--quiet"])
    assert status == 0 and (tmp_path / "e_val.npz").exists()
    assert json.loads(str(np.load(tmp_path / "e_val.npz")["metadata"]))["method"] == "edge_boxes"


def test_cli_train_evaluate_predict_read_the_caches(tiny, tmp_path, capsys):
    from kerasdet import cli
    from kerasdet.data.synthetic import make_dataset

    root = tiny["root"]
    make_dataset(str(root / "train"), 4, seed=1, image_size=(64, 64), split="train", object_size=(12, 32))
    config = tmp_path / "fast.json"
    config.write_text(json.dumps({"class": "kerasdet.models.fast_rcnn:FastRCNN",
                                  "arguments": {"num_classes": 3, "backbone": "tiny", "feature": "C4",
                                                "fc_dim": 32, "seed": 0},
                                  "input": {"image_size": [64, 64]}}))
    caches = str(tmp_path / "p_{split}.npz")
    assert cli.main(["proposals", "--data", tiny["spec"], "--out", caches, "--quiet",
                     "--max-proposals", "100"]) == 0
    run = tmp_path / "run"
    common = ["--data", tiny["spec"], "--batch-size", "2"]
    assert cli.main(["train", str(config), *common, "--out", str(run), "--epochs", "1", "--quiet"]) == 2
    assert "works on external region proposals" in capsys.readouterr().err
    assert cli.main(["train", str(config), *common, "--out", str(run), "--epochs", "1", "--quiet",
                     "--proposals", caches, "--max-proposals", "100"]) == 0
    assert "proposals: " in capsys.readouterr().out
    weights = str(run / "model.weights.h5")
    assert cli.main(["evaluate", str(config), *common, "--weights", weights,
                     "--proposals", caches]) == 0
    assert "VOC mAP@0.5" in capsys.readouterr().out
    image = tiny["data"].image_file(tiny["data"].records[0])
    assert cli.main(["predict", str(config), image, "--weights", weights, "--out", str(tmp_path / "pred"),
                     "--proposals", str(tmp_path / "p_val.npz")]) == 0
    assert "detections" in capsys.readouterr().out
    # the train cache for the val images: ids 5 and 6 are missing (4 train images), and 1..4 repeat
    # in both splits with other files; the error names the cache either way
    assert cli.main(["evaluate", str(config), *common, "--weights", weights,
                     "--proposals", str(tmp_path / "p_train.npz")]) == 2
    assert "p_train.npz: image ids 5, 6" in capsys.readouterr().err
