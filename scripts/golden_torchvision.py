#!/usr/bin/env python3
"""Regenerate reference tensors for the engine's CNNs from torchvision itself (issue 3, Parity).

`../shared/goldens` holds the official references; this script makes the same kind of check
possible without that folder, from the public package the architectures come from:

- ResNet-50 (`torchvision.models.resnet50`, full depth): seeded random weights with random BN
  statistics (so BN folding is exercised), an input in [0,1] normalised with the ImageNet
  mean/std *outside* torchvision's model (the engine's ResNet normalises inside), and the logits,
  the penultimate features, the `layer4` map and the input gradient of Σ_i log_softmax(f(x_i))[y_i]
  (what Clean Grad differentiates).
Every output is also computed in float64, and the f32-vs-f64 distance of torchvision's own run is
stored next to it (`tol.*`): the Rust test checks its f64 run against the f64 reference tightly
and its f32 run within a stated multiple of that round-off scale.
- VGG16 features as DISTS builds them from `torchvision.models.vgg16().features`: the four
  max-pools replaced by L2 pooling (hann window [½, 1, ½], stride 2, padding 1,
  √(conv(x²) + 1e-12)), truncated after relu5_3; the five stage outputs.

  /work/venv-torch/bin/python scripts/golden_torchvision.py [--out target/torchvision-goldens]

then `cargo test -p diffguard-engine --test models_cnn_torchvision` (it reads
$DIFFGUARD_TV_GOLDENS, default target/torchvision-goldens, and says SKIPPED when absent).
Weights are ~160 MB, so they are written, not committed. Needs torch, torchvision, safetensors
(torchvision's model code only: `pip install --no-deps torchvision` next to a newer torch works).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_twin import state_for_rust  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def randomise_bn(model, g):
    """Non-trivial eval-mode BatchNorm: random affine and running statistics."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = (torch.rand(c, generator=g) - 0.5) * 0.2
            m.running_mean.data = (torch.rand(c, generator=g) - 0.5) * 0.2
            m.running_var.data = 0.5 + torch.rand(c, generator=g)


def rel_to_max(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def resnet50_run(net, x, y):
    """Logits, penultimate, layer4 and the input gradient, at the dtype of `net` and `x`."""
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    acts = {}
    hooks = [net.layer4.register_forward_hook(lambda m, i, o: acts.__setitem__("layer4", o.detach())),
             net.avgpool.register_forward_hook(lambda m, i, o: acts.__setitem__("pool", o.detach()))]
    xv = x.clone().requires_grad_(True)
    logits = net((xv - mean) / std)
    F.log_softmax(logits, dim=1).gather(1, y.view(-1, 1)).sum().backward()
    for h in hooks:
        h.remove()
    return {"logits": logits.detach(), "penultimate": acts["pool"].flatten(1),
            "layer4": acts["layer4"], "input_grad": xv.grad}


def resnet50_case(out, g):
    net = torchvision.models.resnet50(weights=None, num_classes=1000)
    randomise_bn(net, g)
    net.eval()
    x = torch.rand(2, 3, 96, 96, generator=g)
    y = torch.tensor([3, 917])
    f32 = resnet50_run(net, x, y)
    f64 = resnet50_run(net.double(), x.double(), y)
    case = {"x01": x, "labels": y.to(torch.int64), **f32}
    for k in f32:
        case[f"f64.{k}"] = f64[k]
        # How far torchvision's own f32 run is from its f64 run: the scale of round-off the
        # engine's f32 run may differ by.
        case[f"tol.{k}"] = torch.tensor([rel_to_max(f32[k], f64[k])], dtype=torch.float64)
    save_file(state_for_rust(net.float()), os.path.join(out, "resnet50.safetensors"))
    save_file(case, os.path.join(out, "resnet50_case.safetensors"))


class L2Pool(nn.Module):
    """DISTS' replacement for VGG's max-pool (spec §8.2)."""

    def __init__(self, channels):
        super().__init__()
        w = torch.hann_window(5, periodic=False)[1:-1]
        k = w[:, None] * w[None, :]
        self.register_buffer("kernel", (k / k.sum()).expand(channels, 1, 3, 3).contiguous())

    def forward(self, x):
        y = F.conv2d(x * x, self.kernel, stride=2, padding=1, groups=x.shape[1])
        return torch.sqrt(y + 1e-12)


def vgg16_case(out, g):
    features = torchvision.models.vgg16(weights=None).features
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d):
            features[i] = L2Pool(features[i - 2].out_channels)
    features = features[:30].eval()  # through relu5_3
    x = torch.rand(2, 3, 64, 64, generator=g)

    def stages(net, x):
        mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
        h, out = (x - mean) / std, []
        with torch.no_grad():
            for i, layer in enumerate(net):
                h = layer(h)
                if i in (3, 8, 15, 22, 29):
                    out.append(h.clone())
        return out

    f32 = stages(features, x)
    weights = {"features." + k: v for k, v in state_for_rust(features).items()
               if "kernel" not in k}
    f64 = stages(features.double(), x.double())
    case = {"x01": x}
    for i, (a, b) in enumerate(zip(f32, f64)):
        case[f"stage{i + 1}"] = a
        case[f"f64.stage{i + 1}"] = b
        case[f"tol.stage{i + 1}"] = torch.tensor([rel_to_max(a, b)], dtype=torch.float64)
    save_file(weights, os.path.join(out, "vgg16.safetensors"))
    save_file(case, os.path.join(out, "vgg16_case.safetensors"))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="target/torchvision-goldens")
    ap.add_argument("--seed", type=int, default=20231001)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)  # torchvision's own initialisers draw from the global RNG
    g = torch.Generator().manual_seed(args.seed)
    resnet50_case(args.out, g)
    vgg16_case(args.out, g)
    with open(os.path.join(args.out, "README.json"), "w") as f:
        json.dump({"torch": torch.__version__, "torchvision": torchvision.__version__,
                   "seed": args.seed, "script": "scripts/golden_torchvision.py"}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
