#!/usr/bin/env python3
"""Regenerate the diffusers `UNet2DModel` parity fixture (issue 3, Parity): the project's pixel DDPM
checked against the public package that defines the architecture family, without outside files.

The project's pixel UNet is the ADM skeleton with scale-shift norm, resampling inside the
ResBlocks and legacy multi-head attention. diffusers' `UNet2DModel` expresses exactly that with
`resnet_time_scale_shift="scale_shift"`, `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D` (and
the attention blocks with `downsample_type` / `upsample_type = "resnet"`), `attn_norm_num_groups`
set (else the middle attention has no GroupNorm under scale-shift), `flip_sin_to_cos=True`,
`freq_shift=0` and `num_class_embeds = classes + 1` (the last row is the null label). The engine
loads such a checkpoint unchanged (`diffguard_engine::models::diffusers`); this script writes one,
with seeded random weights, and the reference output:

  /work/venv-torch/bin/python scripts/golden_diffusers.py [--out crates/engine/tests/data/diffusers-unet2d]

  OUT/config.json                        diffusers' own `save_pretrained` output
  OUT/diffusion_pytorch_model.safetensors
  OUT/case.safetensors                   x (3,C,H,W), t (3,), y (3,) int64, eps = model(x, t, y)

Every 1-D parameter (norm scales and shifts, biases) is perturbed, so a swapped norm or a
dropped bias cannot hide behind PyTorch's identity initialisation. Two levels of 32 channels, two
ResBlocks per level, attention at the second level with two heads (head dim 16), three input
channels, weights stored in float16: small enough to commit (about 1 MB), and every mapping rule of
the loader is exercised (index arithmetic across levels, skip convolutions on the concatenated
skips, head interleaving, the null label, f16 → f32). Needs torch, diffusers, safetensors. The
reference runs in float32; the Rust test's bound is stated there.
"""

import argparse
import os

import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file


def build(seed: int) -> UNet2DModel:
    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        layers_per_block=2,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet",
        upsample_type="resnet",
        resnet_time_scale_shift="scale_shift",
        attention_head_dim=16,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        num_class_embeds=4,
        act_fn="silu",
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="crates/engine/tests/data/diffusers-unet2d")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = build(args.seed)
    os.makedirs(args.out, exist_ok=True)
    # Stored in float16 (half the size; the loader's f16 → f32 path is exercised too); the
    # reference runs in float32 on exactly those rounded weights.
    model.half().save_pretrained(args.out, safe_serialization=True)
    model.float()

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 417, 999], dtype=torch.int64)
    y = torch.tensor([0, 2, 3], dtype=torch.int64)  # 3 = the null label
    with torch.no_grad():
        eps = model(x, t, class_labels=y).sample
    save_file({"x": x, "t": t, "y": y, "eps": eps.contiguous()}, os.path.join(args.out, "case.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n} parameters, eps scale {eps.abs().max().item():.3f}")


if __name__ == "__main__":
    main()
