"""torchvision side of the ps_roi_pool(bin_rule="torchvision") parity test (subprocess; see
tests/conftest.py).

    python tests/torch_refs/ps_roi_pool.py OUT_DIR

Writes OUT_DIR/cases.npz: for every case NAME, NAME/features (NHWC), NAME/boxes [R, 4],
NAME/box_indices, NAME/output_size, NAME/spatial_scale, torchvision.ops.ps_roi_pool's
NAME/output (NHWC) and, for an upstream gradient NAME/upstream, NAME/grad_features (NHWC).
The boxes put many corners exactly half a feature pixel from an integer (rounding ties) and reach
past every border of the map.
"""
import sys

import numpy as np
import torch
import torchvision.ops


def _tie_boxes(rng, count, scale, height, width):
    """Boxes whose corners are whole or half feature pixels (ties of the rounding) around the map."""
    def coords(size):
        return rng.integers(-4, 2 * size + 6, size=(count, 2)) * 0.5 / scale

    x, y = coords(width), coords(height)
    return np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], 1)


def _cases():
    rng = np.random.default_rng(0)
    cases = {}
    # Hand-made boxes on a small map at scale 0.5: ties at odd image coordinates, partly and wholly
    # outside, zero-size, inverted, whole map, the last row and column.
    small = np.array([[2.2, 3.1, 15.7, 12.4], [-6.0, -4.0, 8.0, 6.0], [14.0, 10.0, 30.0, 40.0],
                      [-60.0, -50.0, -30.0, -20.0], [8.0, 8.0, 8.0, 8.0], [0.0, 0.0, 22.0, 18.0],
                      [11.3, 4.6, 6.1, 9.9], [3.0, 5.0, 17.0, 13.0], [-3.0, -1.0, 1.0, 3.0],
                      [19.0, 15.0, 21.0, 17.0], [0.99, 0.99, 21.01, 17.01]], np.float32)
    for name, size, scale in (("small_2x2", (2, 2), 0.5), ("small_3x2", (3, 2), 0.5),
                              ("small_2x3_scale1", (2, 3), 1.0)):
        channels = 2 * size[0] * size[1]
        cases[name] = dict(features=rng.normal(size=(2, 9, 11, channels)), boxes=small,
                           box_indices=rng.integers(0, 2, size=len(small)), output_size=size,
                           spatial_scale=scale)
    # R-FCN's head: 7x7 bins at stride 16 on a 38x50 map, random and tied corners.
    boxes = np.concatenate([_tie_boxes(rng, 60, 1 / 16, 38, 50),
                            rng.uniform(-40, 840, size=(60, 4))], 0)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                            np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    cases["rfcn_7x7"] = dict(features=rng.normal(size=(2, 38, 50, 49 * 3)), boxes=boxes,
                             box_indices=rng.integers(0, 2, size=len(boxes)), output_size=(7, 7),
                             spatial_scale=1 / 16)
    # Boxes that stay off the last row and column: there torchvision's backward (clipped to the
    # map) and its forward (clipped one pixel short) use the same bins, so its gradient is the
    # derivative of its output and comparable.
    xy = rng.uniform(0, 300, size=(40, 2))
    inner = np.concatenate([xy, xy + rng.uniform(0, 280, size=(40, 2))], 1)
    cases["interior_gradient"] = dict(features=rng.normal(size=(2, 38, 50, 49 * 2)), boxes=inner,
                                      box_indices=rng.integers(0, 2, size=len(inner)),
                                      output_size=(7, 7), spatial_scale=1 / 16)
    return cases


def main(out_dir):
    out = {}
    for name, case in _cases().items():
        features = case["features"].astype(np.float32)
        boxes = case["boxes"].astype(np.float32)
        box_indices = case["box_indices"].astype(np.int32)
        ph, pw = case["output_size"]
        x = torch.from_numpy(features).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        rois = torch.cat([torch.from_numpy(box_indices.astype(np.float32))[:, None],
                          torch.from_numpy(boxes)], 1)
        y = torchvision.ops.ps_roi_pool(x, rois, (ph, pw), float(case["spatial_scale"]))
        upstream = np.random.default_rng(1).normal(size=y.shape).astype(np.float32)  # NCHW
        (y * torch.from_numpy(upstream)).sum().backward()
        for key, value in (("features", features), ("boxes", boxes), ("box_indices", box_indices),
                           ("output_size", np.array([ph, pw], np.int32)),
                           ("spatial_scale", np.float32(case["spatial_scale"])),
                           ("output", y.detach().permute(0, 2, 3, 1).numpy()),
                           ("upstream", upstream.transpose(0, 2, 3, 1)),
                           ("grad_features", x.grad.permute(0, 2, 3, 1).numpy())):
            out[f"{name}/{key}"] = value
    np.savez(f"{out_dir}/cases.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1])
