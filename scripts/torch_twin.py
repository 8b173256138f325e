#!/usr/bin/env python3
"""PyTorch twin of the project's own networks, for GPU training and cross-framework checks.

The project's networks live in Rust (crates/engine/src/models). This file re-states two of them in
PyTorch with the *same tensor names and semantics*, so that weights move between the frameworks
unchanged:

- `AdmUNet`: the openai/guided-diffusion UNet skeleton the pixel DDPM uses (scale-shift norm,
  resampling inside the ResBlocks, legacy multi-head attention, a label table with a null row);
- `SmallResNet`: the torchvision-named BasicBlock ResNet with a 3x3 stem used as the
  Fashion-MNIST classifier (input normalisation inside the model).

Why it exists: the Rust trainer (`examples/train_*`, candle autograd) is the reference trainer,
but on a 2-core CPU it cannot train the diffusion prior to quality in a session. When a GPU
machine is available, this twin trains the same architecture with the same objective there, and
the Rust engine loads the result. Three checks keep the twin honest:

1. `check-golden`: the twin ADM reproduces the official guided-diffusion outputs in
   ../shared/goldens/adm_unet (the same goldens the Rust UNet is tested against);
2. `parity`: writes random weights, an input and the twin's outputs to a safetensors file that
   the Rust test `models_unet_pixel::torch_twin_parity` checks the Rust networks against;
3. the trained weights are re-validated in Rust (`diffguard calibrate`, the shipped-weights tests).

Commands (see --help of each):
  check-golden   compare the twin ADM with ../shared/goldens/adm_unet
  parity         write tests/fixtures-style parity data for the Rust tests
  train          train the classifier and/or the diffusion prior on Fashion-MNIST (GPU if present)

Requires: torch, numpy, safetensors; blake3 only for computing the train/validation split (or pass
--split-file with the validation indices).
"""

import argparse
import copy
import gzip
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# ---- the ADM UNet --------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's GroupNorm: statistics in float32."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def norm(ch):
    return GroupNorm32(32, ch, eps=1e-5)


def timestep_embedding(t, dim):
    """[cos, sin] with frequencies exp(-ln(10000) i / half), in float32."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000) * i / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin, emb_dim, cout, resample="keep"):
        super().__init__()
        self.resample, self.cout = resample, cout
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_layers = nn.Sequential(
            norm(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def _resample(self, x):
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        h = self.in_layers[2](self._resample(h))
        x = self._resample(x)
        e = self.emb_layers(emb)[:, :, None, None]
        scale, shift = e.chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """AttentionBlock with QKVAttentionLegacy: per head the channels are [q, k, v]."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads = heads
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        d = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * d, length).split(d, dim=1)
        scale = 1 / math.sqrt(math.sqrt(d))
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, length)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class Seq(nn.Sequential):
    """TimestepEmbedSequential: ResBlocks see the embedding, the rest do not."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class AdmUNet(nn.Module):
    """The UNetSpec of crates/engine/src/models/adm_unet.rs with use_scale_shift_norm and
    resblock_updown on (the pixel DDPM's and the ADM golden's settings)."""

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks,
                 channel_mult, attention_ds, num_head_channels, label_rows=None):
        super().__init__()
        mc, emb = model_channels, 4 * model_channels
        self.mc = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Embedding(label_rows, emb) if label_rows else None

        def attn(ch):
            return AttentionBlock(ch, max(ch // num_head_channels, 1))

        ch = channel_mult[0] * mc
        input_ch = ch
        self.input_blocks = nn.ModuleList([Seq(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * mc)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(Seq(*layers))
                chans.append(ch)
            if level + 1 != len(channel_mult):
                self.input_blocks.append(Seq(ResBlock(ch, emb, ch, "down")))
                chans.append(ch)
                ds *= 2
        self.middle_block = Seq(ResBlock(ch, emb, ch), attn(ch), ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mult * mc)]
                ch = mult * mc
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, ch, "up"))
                    ds //= 2
                self.output_blocks.append(Seq(*layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(input_ch, out_channels, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x, t, y=None):
        emb = self.time_embed(timestep_embedding(t, self.mc).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def pixel_unet(cfg):
    """The project's pixel DDPM from a bundle's `pixel_unet` config (ε only, null label last)."""
    return AdmUNet(cfg["in_channels"], cfg["model_channels"], cfg["in_channels"],
                   cfg["num_res_blocks"], cfg["channel_mult"], cfg["attention_ds"],
                   cfg["num_head_channels"], label_rows=cfg["num_classes"] + 1)


# ---- the small ResNet ----------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    """`ResNetConfig::small`: 3x3 stride-1 stem, BasicBlocks, stage i>0 halves the resolution;
    takes images in [0,1] and normalises inside."""

    def __init__(self, cfg):
        super().__init__()
        w0 = cfg["stem_width"]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, -1, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(cfg["in_channels"], w0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        cin = w0
        for i, (n, w) in enumerate(zip(cfg["layers"], cfg["widths"])):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i and j == 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.n_stages = len(cfg["layers"])
        self.fc = nn.Linear(cin, cfg["num_classes"])

    def forward(self, x01):
        h = F.relu(self.bn1(self.conv1((x01 - self.mean) / self.std)))
        for i in range(self.n_stages):
            h = getattr(self, f"layer{i + 1}")(h)
        return self.fc(h.mean(dim=(2, 3)))


def state_for_rust(model):
    """Tensors as the Rust loaders expect them: no BN counters, contiguous float32."""
    return {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


# ---- checks --------------------------------------------------------------------------------


def check_golden(args):
    d = os.path.join(args.goldens, "adm_unet")
    cfg = json.load(open(os.path.join(d, "config.json")))["derived_unet_args"]
    w = {k: v.float() for k, v in load_file(os.path.join(d, "weights.safetensors")).items()}
    case = load_file(os.path.join(d, "case.safetensors"))
    worst = 0.0
    for variant, key in [("uncond", "out_uncond"), ("class_cond", "out_class_cond")]:
        rows = w["label_emb.weight"].shape[0] if variant == "class_cond" else None
        net = AdmUNet(3, cfg["model_channels"], cfg["out_channels"], 1, cfg["channel_mult"],
                      cfg["attention_resolutions_ds"], 8, label_rows=rows)
        sd = {k: v for k, v in w.items() if rows or k != "label_emb.weight"}
        net.load_state_dict(sd, strict=True)
        y = case["labels"] if rows else None
        with torch.no_grad():
            out = net(case["x"], case["timesteps"], y)
        err = (out - case[key]).abs().max().item()
        scale = case[key].abs().max().item()
        print(f"adm_unet {variant}: max |twin - official| = {err:.3e} (output scale {scale:.2f})")
        worst = max(worst, err / scale)
    emb = timestep_embedding(case["timesteps"], 32)
    e = (emb - case["timestep_embedding"]).abs().max().item()
    print(f"timestep_embedding: max diff {e:.3e}")
    # Both run in float32 on the same (float16-exact) weights; 1e-4 of the output scale covers
    # float32 rounding differences (summation order) through ~40 layers.
    ok = worst < 1e-4 and e < 1e-5
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def parity(args):
    """Random weights (non-zero everywhere), an input, the twin's outputs: for the Rust tests."""
    torch.manual_seed(args.seed)
    unet_cfg = dict(image_size=8, in_channels=1, model_channels=32, channel_mult=[1, 1],
                    num_res_blocks=1, attention_ds=[2], num_head_channels=32, num_classes=3)
    res_cfg = dict(in_channels=1, stem_width=8, layers=[1, 1], widths=[8, 16], num_classes=3,
                   mean=[0.25], std=[0.5])
    unet, resnet = pixel_unet(unet_cfg), SmallResNet(res_cfg)
    tensors = {}
    for prefix, net in [("unet.", unet), ("resnet.", resnet)]:
        with torch.no_grad():
            for name, p in net.named_parameters():
                fan = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn_like(p) / math.sqrt(fan) + (1.0 if "bn" in name and name.endswith("weight") else 0.0))
            for name, b in net.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(torch.randn_like(b) * 0.1)
                elif name.endswith("running_var"):
                    b.copy_(torch.rand_like(b) + 0.5)
        net.eval()
        tensors.update({prefix + k: v for k, v in state_for_rust(net).items()})
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([7, 640])
    y = torch.tensor([2, 3])  # 3 = the null label
    img = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        tensors.update({
            "case.x": x, "case.t": t.to(torch.int64), "case.y": y.to(torch.int64),
            "case.eps": unet(x, t, y), "case.image": img, "case.logits": resnet(img),
        })
    meta = {"unet": json.dumps(unet_cfg), "resnet": json.dumps(res_cfg),
            "made_by": "scripts/torch_twin.py parity", "torch": torch.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(tensors)} tensors")
    return 0


# ---- data ----------------------------------------------------------------------------------


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def validation_indices(labels, seed=20_230_601, per_class=500):
    """crates/engine/src/data/fashion.rs: the first 500 of each class in blake3 hash order."""
    import blake3

    def key(i):
        h = blake3.blake3(b"diffguard-split-v1" + struct.pack("<Q", seed) + struct.pack("<Q", i))
        return (struct.unpack("<Q", h.digest()[:8])[0], i)

    out = []
    for c in sorted(set(labels.tolist())):
        members = sorted((i for i in range(len(labels)) if labels[i] == c), key=key)
        out.extend(members[:per_class])
    return sorted(out)


def fashion(data_dir, split_file):
    d = os.path.join(data_dir, "fashion-mnist")
    xs, ys = read_idx(os.path.join(d, "train-images-idx3-ubyte.gz")), read_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"))
    xt, yt = read_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz")), read_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    if split_file and os.path.exists(split_file):
        val = json.load(open(split_file))["validation"]
    else:
        val = validation_indices(ys)
    keep = np.ones(len(ys), dtype=bool)
    keep[val] = False
    return (xs[keep], ys[keep]), (xt, yt), val


# ---- training ------------------------------------------------------------------------------


class Ema:
    """EMA of every float tensor of the state dict (parameters and BN statistics)."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


class Budget:
    def __init__(self, secs):
        self.start, self.secs = time.time(), secs

    def left(self):
        return self.secs - (time.time() - self.start)


def log(msg):
    print(msg, flush=True)


def save_weights(model, path, meta):
    tmp = path + ".part"
    save_file(state_for_rust(model), tmp, metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def augment_shift(x, max_shift):
    """Random ±max_shift px translation with zero fill (per batch item), as the Rust trainer."""
    if not max_shift:
        return x
    b, _, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), device=x.device)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])  # (b,h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])  # (b,w)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    return p[idx_b, 0, rows[:, :, None], cols[:, None, :]][:, None]


def hflip(x):
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_classifier(args, cfg, train, test, dev):
    x = torch.tensor(train[0], device=dev).float().div(255).unsqueeze(1)
    y = torch.tensor(train[1], device=dev).long()
    net = SmallResNet(cfg).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=args.cls_lr, weight_decay=0.05)
    ema = Ema(net, 0.998)
    budget = Budget(args.cls_secs)
    step, total, t0 = 0, args.cls_steps, time.time()
    losses = []
    while step < total and budget.left() > 0:
        if step == 100:  # fit the cosine schedule into the time budget
            per = (time.time() - t0) / 100
            total = min(args.cls_steps, int(100 + (budget.left() - 5) / per))
            log(f"classifier: {per * 1e3:.1f} ms/step -> {total} steps")
        lr = args.cls_lr * (min(1.0, (step + 1) / 200) if step < 200 else
                            0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - 200) / max(1, total - 200))))
        for g in opt.param_groups:
            g["lr"] = lr
        i = torch.randint(0, len(y), (args.cls_batch,), device=dev)
        xb = augment_shift(hflip(x[i]), 2)
        loss = F.cross_entropy(net(xb), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        step += 1
        if step % 500 == 0:
            losses.append({"step": step, "loss": loss.item()})
            log(f"classifier step {step}/{total} loss {loss.item():.4f}")
    # A short run leaves the EMA (and its averaged BN statistics) behind the live weights:
    # keep whichever is better on the test set and say which.
    acc_ema, acc_raw = accuracy(ema.model, test, dev), accuracy(net, test, dev)
    best, which = (ema.model, "ema") if acc_ema >= acc_raw else (net, "raw")
    log(f"classifier: {step} steps, test accuracy EMA {acc_ema:.4f}, raw {acc_raw:.4f}")
    return best, {"steps": step, "batch": args.cls_batch, "lr": args.cls_lr,
                  "test_accuracy": max(acc_ema, acc_raw), "weights": which,
                  "test_accuracy_ema": acc_ema, "test_accuracy_raw": acc_raw,
                  "wall_secs": time.time() - budget.start, "loss_log": losses}


@torch.no_grad()
def accuracy(net, test, dev):
    net.eval()
    x = torch.tensor(test[0], device=dev).float().div(255).unsqueeze(1)
    y = torch.tensor(test[1], device=dev).long()
    pred = torch.cat([net(x[i:i + 1000]).argmax(1) for i in range(0, len(y), 1000)])
    return (pred == y).float().mean().item()


def alpha_bar(dev):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(dev)


def train_diffusion(args, cfg, train, dev, out_dir):
    x = torch.tensor(train[0], device=dev).float().div(127.5).sub(1).unsqueeze(1)
    y = torch.tensor(train[1], device=dev).long()
    net = pixel_unet(cfg).to(dev)
    params = sum(p.numel() for p in net.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=args.diff_lr, weight_decay=0.0)
    ema = Ema(net, args.ema)
    ab = alpha_bar(dev).float()
    null = cfg["num_classes"]
    budget, step, losses, run = Budget(args.diff_secs), 0, [], 0.0
    last_save = time.time()
    path = os.path.join(out_dir, "diffusion.safetensors")
    while step < args.diff_steps and budget.left() > 0:
        for g in opt.param_groups:
            g["lr"] = args.diff_lr * min(1.0, (step + 1) / 500)
        i = torch.randint(0, len(y), (args.diff_batch,), device=dev)
        x0 = hflip(x[i])
        lab = torch.where(torch.rand(len(i), device=dev) < 0.1, torch.full_like(y[i], null), y[i])
        t = torch.randint(0, 1000, (len(i),), device=dev)
        eps = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(net(xt, t, lab), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)
        step += 1
        run = loss.item() if step == 1 else 0.99 * run + 0.01 * loss.item() if step % 10 == 0 else run
        if step % 1000 == 0:
            losses.append({"step": step, "loss": run})
            log(f"diffusion step {step} loss(ema) {run:.4f} {budget.left():.0f}s left")
        if time.time() - last_save > args.save_every:
            save_weights(ema.model, path, {"step": step})
            last_save = time.time()
    save_weights(ema.model, path, {"step": step})
    report = {"model": "pixel-ddpm", "trainer": "scripts/torch_twin.py", "parameters": params,
              "train_images": len(y), "batch": args.diff_batch, "step": step,
              "lr": args.diff_lr, "ema_decay": args.ema, "p_uncond": 0.1,
              "wall_secs": time.time() - budget.start, "loss_log": losses}
    return ema.model, report


@torch.no_grad()
def ddim_sample(net, labels, steps, scale, null, dev, seed=0):
    """DDIM (η=0) with classifier-free guidance ε = ε_u + s(ε_c − ε_u), x̂0 clipped."""
    g = torch.Generator(device=dev).manual_seed(seed)
    ab = alpha_bar(dev)
    ts = list(range(0, 1000, 1000 // steps))[::-1]
    x = torch.randn(len(labels), 1, 28, 28, generator=g, device=dev)
    for k, t in enumerate(ts):
        tt = torch.full((len(labels),), t, device=dev)
        e = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, torch.full_like(labels, null)]))
        ec, eu = e.chunk(2)
        e = eu + scale * (ec - eu)
        a = ab[t].float()
        a_prev = ab[ts[k + 1]].float() if k + 1 < len(ts) else torch.tensor(1.0, device=dev)
        x0 = ((x - (1 - a).sqrt() * e) / a.sqrt()).clamp(-1, 1)
        e = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x


def sample_report(unet, clf, cfg, dev, out_dir, per_class=100):
    """Classifier accuracy on DDIM-50 CFG-3 samples, per class, and a PNG grid."""
    null = cfg["num_classes"]
    labels = torch.arange(null, device=dev).repeat_interleave(per_class)
    xs = torch.cat([ddim_sample(unet, labels[i:i + 500], 50, 3.0, null, dev, seed=i)
                    for i in range(0, len(labels), 500)])
    pred = torch.cat([clf((xs[i:i + 1000] + 1) / 2).argmax(1) for i in range(0, len(xs), 1000)])
    per = [(pred[labels == c] == c).float().mean().item() for c in range(null)]
    try:
        from PIL import Image
        cols = min(10, per_class)
        grid = ((xs.view(null, per_class, 28, 28)[:, :cols] + 1) * 127.5).clamp(0, 255).byte().cpu()
        img = grid.permute(0, 2, 1, 3).reshape(null * 28, cols * 28).numpy()
        Image.fromarray(img, mode="L").save(os.path.join(out_dir, "samples.png"))
    except Exception as e:  # the numbers matter more than the picture
        log(f"no grid: {e}")
    return {"sampler": "DDIM-50, CFG scale 3, x0 clipped", "per_class": per_class,
            "accuracy_per_class": per, "accuracy": sum(per) / len(per)}


def train(args):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    bundle = json.load(open(args.bundle))
    (train_x, train_y), test, val = fashion(args.data, args.split_file)
    log(f"device {dev}, train {len(train_y)} (validation {len(val)} held out), test {len(test[1])}")
    os.makedirs(args.out, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
              "torch": torch.__version__}
    clf = None
    if args.cls_secs > 0:
        clf, report["classifier"] = train_classifier(args, bundle["classifier"]["resnet"],
                                                     (train_x, train_y), test, dev)
        save_weights(clf, os.path.join(args.out, "classifier.safetensors"), report["classifier"])
    if args.diff_init:
        cfg = bundle["denoiser"]["pixel_unet"]
        unet = pixel_unet(cfg).to(dev)
        unet.load_state_dict(load_file(args.diff_init), strict=True)
        if clf is not None:
            report["samples"] = sample_report(unet.eval(), clf.eval(), cfg, dev, args.out,
                                              args.samples_per_class)
            log(f"sample accuracy: {report['samples']['accuracy']:.3f}")
    if args.diff_secs > 0:
        unet, report["diffusion"] = train_diffusion(args, bundle["denoiser"]["pixel_unet"],
                                                    (train_x, train_y), dev, args.out)
        json.dump(report, open(os.path.join(args.out, "train-report.json"), "w"), indent=1)
        if clf is not None:
            report["diffusion"]["samples"] = sample_report(
                unet.eval(), clf.eval(), bundle["denoiser"]["pixel_unet"], dev, args.out,
                args.samples_per_class)
            log(f"sample accuracy: {report['diffusion']['samples']['accuracy']:.3f}")
    json.dump(report, open(os.path.join(args.out, "train-report.json"), "w"), indent=1)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("check-golden")
    g.add_argument("--goldens", default=os.path.join(os.path.dirname(__file__), "../../shared/goldens"))
    p = sub.add_parser("parity")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=7)
    t = sub.add_parser("train")
    t.add_argument("--bundle", default="models/fashion-mnist/bundle.json")
    t.add_argument("--data", default=os.environ.get("DIFFGUARD_DATA", "data"))
    t.add_argument("--split-file", help="JSON {validation: [indices]} (else computed with blake3)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cls-secs", type=float, default=0, help="classifier time budget (0 = skip)")
    t.add_argument("--cls-steps", type=int, default=20000)
    t.add_argument("--cls-batch", type=int, default=128)
    t.add_argument("--cls-lr", type=float, default=2e-3)
    t.add_argument("--diff-init", help="an existing diffusion.safetensors to report samples of")
    t.add_argument("--diff-secs", type=float, default=0, help="diffusion time budget (0 = skip)")
    t.add_argument("--diff-steps", type=int, default=1_000_000)
    t.add_argument("--diff-batch", type=int, default=256)
    t.add_argument("--diff-lr", type=float, default=3e-4)
    t.add_argument("--ema", type=float, default=0.9995)
    t.add_argument("--save-every", type=float, default=60)
    t.add_argument("--samples-per-class", type=int, default=100,
                   help="class-conditional samples per class for the quality report")
    a = ap.parse_args()
    return {"check-golden": check_golden, "parity": parity, "train": train}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
