"""`kerasdet predict` with a converted torchvision Faster R-CNN gives torchvision's own detections on
a photo that needs padding (the user's path: the zoo entry's resize rule, the command line, boxes in
the photo's pixels).

The photo (scikit-image's chelsea, 300 x 451) is resized by torchvision to 800 x 1202 (its size is
floor(side x scale)) and padded to 800 x 1216; torchvision pads the normalized image with zeros.
Before kerasdet filled its padding with the normalization mean and used torchvision's rounding,
about a fifth of the detections differed on such a photo.
"""
import json
import os
import subprocess
import sys

import numpy as np


def _run(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "kerasdet.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=1200)
    assert done.returncode == 0, f"kerasdet {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_cli_predict_matches_torchvision_on_a_padded_photo(torch_reference, tmp_path):
    ref_dir = torch_reference("detector_photo", "fasterrcnn_resnet50_fpn")
    ref = dict(np.load(ref_dir / "outputs.npz"))
    assert tuple(ref["resized_size"]) == (800, 1202) and tuple(ref["padded_size"]) == (800, 1216)
    weights = str(tmp_path / "frcnn.weights.h5")
    _run("convert", str(ref_dir / "model.pth"), "--arch", "fasterrcnn_resnet50_fpn", "--out", weights,
         cwd=tmp_path)
    _run("predict", "faster_rcnn_r50_fpn_torchvision", "--weights", weights, str(ref_dir / "photo.png"),
         "--out", str(tmp_path / "pred"), "--score-threshold", "0", cwd=tmp_path)
    with open(os.path.join(tmp_path, "pred", "detections.json"), encoding="utf-8") as handle:
        detections = json.load(handle)[0]["detections"]
    # kerasdet's class k is COCO category id k + 1, torchvision's label is the id itself.
    ours = np.array([[d["class_id"] + 1, d["score"], *d["box_xyxy"]] for d in detections])
    theirs = np.concatenate([ref["det_labels"][:, None], ref["det_scores"][:, None], ref["det_boxes"]], axis=1)
    assert ours.shape == theirs.shape == (100, 6)
    # Each detection (label, score, box in photo pixels) has its twin on the other side; measured
    # 7.7e-5 at most. Compared as sets: only exactly tied scores could swap places.
    distance = np.abs(ours[:, None, :] - theirs[None, :, :]).max(-1)
    worst = max(distance.min(1).max(), distance.min(0).max())
    print(f"kerasdet predict vs torchvision on a padded photo: max abs diff {worst:.3g}")
    assert worst <= 1e-3
