"""torchvision side of the ResNet parity test (subprocess; see tests/conftest.py).

    python tests/torch_refs/resnet.py OUT_DIR DEPTH

Random torchvision resnet{DEPTH} with randomized BN statistics and damped residual branches (so
activations stay O(1) and the BN mapping is exercised); writes OUT_DIR/model.pth and
OUT_DIR/outputs.npz: the NHWC input image (already normalized), layer1..layer4 outputs (NHWC), logits.
"""
import sys

import numpy as np
import torch
import torchvision


def main(out_dir, depth):
    torch.manual_seed(0)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("bn3.weight", "downsample.1.weight")):
                tensor.copy_(0.05 + 0.2 * torch.rand(tensor.shape, generator=generator))
            elif name.endswith(("bn1.weight", "bn2.weight", "running_var")):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif ("bn" in name or "downsample.1" in name) and name.endswith(("running_mean", ".bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    torch.save(model.state_dict(), f"{out_dir}/model.pth")
    image = torch.randn(1, 3, 75, 91, generator=generator)  # odd sizes: padding must match
    out = {"image": image.permute(0, 2, 3, 1).numpy()}
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(image))))
        for k in range(1, 5):
            x = getattr(model, f"layer{k}")(x)
            out[f"C{k + 1}"] = x.permute(0, 2, 3, 1).numpy()
        out["logits"] = model.fc(torch.flatten(model.avgpool(x), 1)).numpy()
    np.savez(f"{out_dir}/outputs.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
