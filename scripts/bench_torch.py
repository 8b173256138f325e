#!/usr/bin/env python3
"""PyTorch side of the whole-network CPU benchmark (crates/engine/examples/bench_networks.rs).

Same networks, shapes, inputs, repeat rules and measurements as the Rust example, so that
scripts/bench_vs_torch.sh can put the two side by side as ratios:

- unet-stack  issue 4's small UNet stack: ADM skeleton, 128 channels, levels 32² and 16² with 2
              ResBlocks each, single-head attention at 16², B=8
- pixel-ddpm  the shipped pixel DDPM (models/fashion-mnist/bundle.json), 28², B=16
- resnet50    torchvision-layout ResNet-50 (v1.5, normalisation inside), 224², B=1
- adm64       guided-diffusion 256x256_diffusion_uncond widths, run on a 64² input, B=1
- vgg16       VGG16 features to relu5_3 with piq's L2 pooling (DISTS), 224², B=1, forward only
- adm256      the same ADM at the paper's 256², B=1, forward only
- ldm64       latent-diffusion cin256-v2 UNet (SpatialTransformer, context 1x512) on its 64²
              latent, B=1, forward only

The ADM UNets come from scripts/torch_twin.py (checked against the official guided-diffusion
goldens); ResNet-50, VGG16 and the LDM UNet are re-stated here (torchvision is not installed and
latent-diffusion is not a package), following the official modules op for op (the LDM attention
is its einsum + softmax form, not a fused kernel).

Modes: fwd under torch.no_grad(); fwdbwd with parameters frozen (requires_grad False) and the input
requiring grad, backward seeded with ones (candle's non-scalar backward seeds ones too).
Each case runs in a fresh subprocess (threads fixed, peak RSS not polluted by earlier cases).
Per case: build, trim the heap and reset the RSS high-water mark, one warm-up call, then timed
calls until a minimum count and a time budget are both met; median wall and median process CPU
(time.process_time, all threads) per call; peak RSS above the post-build baseline.

  /work/venv-torch/bin/python scripts/bench_torch.py [--nets a,b] [--threads 1,2]
      [--modes fwd,fwdbwd] [--reps-scale F] [--jsonl PATH]
"""

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# key -> (title, input shape, has backward, min reps, time budget s); mirrors NETS in the Rust example.
NETS = {
    "unet-stack": ("UNet stack 128c 32² (issue 4) B=8", (8, 3, 32, 32), True, 3, 4.0),
    "pixel-ddpm": ("pixel DDPM (shipped) 28² B=16", (16, 1, 28, 28), True, 5, 3.0),
    "resnet50": ("ResNet-50 224² B=1", (1, 3, 224, 224), True, 5, 3.0),
    "adm64": ("ADM-256 widths at 64² B=1", (1, 3, 64, 64), True, 3, 4.0),
    "vgg16": ("VGG16 features (L2 pool) 224² B=1", (1, 3, 224, 224), False, 3, 3.0),
    "adm256": ("ADM-256 uncond at 256² B=1", (1, 3, 256, 256), False, 2, 0.0),
    "ldm64": ("LDM cin256-v2 UNet, 64² latent B=1", (1, 3, 64, 64), False, 3, 4.0),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def models():
    """Model definitions; imported lazily so the parent process does not load torch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    sys.path.insert(0, HERE)
    from torch_twin import AdmUNet, pixel_unet

    class Bottleneck(nn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * planes)
            self.downsample = None
            if stride != 1 or cin != 4 * planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes)
                )

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            h = F.relu(self.bn2(self.conv2(h)))
            h = self.bn3(self.conv3(h))
            return F.relu(h + (x if self.downsample is None else self.downsample(x)))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            cin = 64
            for i, (n, w) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512])):
                blocks = []
                for j in range(n):
                    blocks.append(Bottleneck(cin, w, 2 if (i and j == 0) else 1))
                    cin = 4 * w
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.fc = nn.Linear(cin, 1000)

        def forward(self, x01):
            h = F.relu(self.bn1(self.conv1((x01 - self.mean) / self.std)))
            h = F.max_pool2d(h, 3, 2, 1)
            for i in range(4):
                h = getattr(self, f"layer{i + 1}")(h)
            return self.fc(h.mean(dim=(2, 3)))

    class Vgg16L2(nn.Module):
        """VGG16 features to relu5_3, every max-pool replaced by piq's L2 pool."""

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
            hann = torch.tensor([1.0, 2.0, 1.0])
            k = (hann[:, None] * hann[None, :]) / 16
            self.stages = nn.ModuleList()
            cin = 3
            for i, (n, w) in enumerate(zip([2, 2, 3, 3, 3], [64, 128, 256, 512, 512])):
                convs = []
                for _ in range(n):
                    convs.append(nn.Conv2d(cin, w, 3, 1, 1))
                    cin = w
                self.stages.append(nn.ModuleList(convs))
                if i:
                    c_in = [64, 128, 256, 512][i - 1]
                    self.register_buffer(f"pool{i}", k.expand(c_in, 1, 3, 3).contiguous())

        def forward(self, x01):
            # Every stage's output is kept, as DISTS (piq) keeps them for its statistics and as the
            # engine's `forward_stages` returns them; the last one is the result.
            h = (x01 - self.mean) / self.std
            stages = []
            for i, convs in enumerate(self.stages):
                if i:
                    kern = getattr(self, f"pool{i}")
                    h = torch.sqrt(F.conv2d(h * h, kern, stride=2, padding=1, groups=h.shape[1]) + 1e-12)
                for c in convs:
                    h = F.relu(c(h))
                stages.append(h)
            return stages[-1]

    class LdmResBlock(nn.Module):
        """openaimodel ResBlock as cin256-v2 uses it: no scale-shift norm, additive embedding."""

        def __init__(self, cin, emb, cout):
            super().__init__()
            self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(),
                                           nn.Conv2d(cin, cout, 3, padding=1))
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
            self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(),
                                            nn.Conv2d(cout, cout, 3, padding=1))
            self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

        def forward(self, x, emb, ctx):
            h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
            return self.skip(x) + self.out_layers(h)

    class CrossAttention(nn.Module):
        def __init__(self, dim, ctx_dim, heads, d_head):
            super().__init__()
            inner, self.heads, self.scale = heads * d_head, heads, d_head ** -0.5
            self.to_q = nn.Linear(dim, inner, bias=False)
            self.to_k = nn.Linear(ctx_dim, inner, bias=False)
            self.to_v = nn.Linear(ctx_dim, inner, bias=False)
            self.to_out = nn.Linear(inner, dim)

        def forward(self, x, ctx=None):
            ctx = x if ctx is None else ctx
            b, h = x.shape[0], self.heads

            def split(t):
                return t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], -1)

            q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
            w = torch.einsum("bid,bjd->bij", q, k) * self.scale
            out = torch.einsum("bij,bjd->bid", w.softmax(dim=-1), v)
            out = out.reshape(b, h, out.shape[1], -1).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
            return self.to_out(out)

    class TransformerBlock(nn.Module):
        def __init__(self, dim, heads, d_head, ctx_dim):
            super().__init__()
            self.attn1 = CrossAttention(dim, dim, heads, d_head)
            self.attn2 = CrossAttention(dim, ctx_dim, heads, d_head)
            self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
            self.ff_in, self.ff_out = nn.Linear(dim, 8 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x, ctx):
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x), ctx) + x
            a, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
            return self.ff_out(a * F.gelu(gate)) + x

    class SpatialTransformer(nn.Module):
        def __init__(self, ch, ctx_dim):
            super().__init__()
            self.norm = nn.GroupNorm(32, ch, eps=1e-6)
            self.proj_in = nn.Conv2d(ch, ch, 1)
            self.block = TransformerBlock(ch, 1, ch, ctx_dim)  # legacy: 1 head of ch channels
            self.proj_out = nn.Conv2d(ch, ch, 1)

        def forward(self, x, emb, ctx):
            b, c, hh, ww = x.shape
            t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
            t = self.block(t, ctx).transpose(1, 2).reshape(b, c, hh, ww)
            return self.proj_out(t) + x

    class Plain(nn.Module):
        """A layer that takes neither the embedding nor the context (convs, resampling)."""

        def __init__(self, *layers):
            super().__init__()
            self.f = nn.Sequential(*layers)

        def forward(self, x, emb, ctx):
            return self.f(x)

    class Blocks(nn.ModuleList):
        def forward(self, x, emb, ctx):
            for layer in self:
                x = layer(x, emb, ctx)
            return x

    class LdmUNet(nn.Module):
        """openaimodel.UNetModel with cin256-v2's settings (LdmUNetConfig::cin256_v2)."""

        def __init__(self, mc=192, mult=(1, 2, 3, 5), nrb=2, attn_ds=(8, 4, 2), ctx_dim=512):
            super().__init__()
            emb = 4 * mc
            self.mc = mc
            self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
            self.input_blocks = nn.ModuleList([Blocks([Plain(nn.Conv2d(3, mc, 3, padding=1))])])
            ch, ds, chans = mc, 1, [mc]
            for level, m in enumerate(mult):
                for _ in range(nrb):
                    layers = [LdmResBlock(ch, emb, m * mc)]
                    ch = m * mc
                    if ds in attn_ds:
                        layers.append(SpatialTransformer(ch, ctx_dim))
                    self.input_blocks.append(Blocks(layers))
                    chans.append(ch)
                if level + 1 != len(mult):
                    self.input_blocks.append(Blocks([Plain(nn.Conv2d(ch, ch, 3, 2, 1))]))
                    chans.append(ch)
                    ds *= 2
            self.middle = Blocks([LdmResBlock(ch, emb, ch), SpatialTransformer(ch, ctx_dim),
                                  LdmResBlock(ch, emb, ch)])
            self.output_blocks = nn.ModuleList()
            for level, m in reversed(list(enumerate(mult))):
                for i in range(nrb + 1):
                    layers = [LdmResBlock(ch + chans.pop(), emb, m * mc)]
                    ch = m * mc
                    if ds in attn_ds:
                        layers.append(SpatialTransformer(ch, ctx_dim))
                    if level and i == nrb:
                        layers.append(Plain(nn.Upsample(scale_factor=2, mode="nearest"),
                                            nn.Conv2d(ch, ch, 3, padding=1)))
                        ds //= 2
                    self.output_blocks.append(Blocks(layers))
            self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))

        def forward(self, x, t, ctx):
            from torch_twin import timestep_embedding
            emb = self.time_embed(timestep_embedding(t, self.mc))
            hs, h = [], x
            for block in self.input_blocks:
                h = block(h, emb, ctx)
                hs.append(h)
            h = self.middle(h, emb, ctx)
            for block in self.output_blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb, ctx)
            return self.out(h)

    def shipped_pixel_cfg():
        with open(os.path.join(HERE, "..", "models", "fashion-mnist", "bundle.json")) as f:
            return json.load(f)["denoiser"]["pixel_unet"]

    def build(key, batch):
        t = torch.full((batch,), 500, dtype=torch.long)
        if key == "unet-stack":
            net = AdmUNet(3, 128, 3, 2, [1, 1], [2], 128, label_rows=None)
            return net, lambda x: net(x, t)
        if key == "pixel-ddpm":
            net = pixel_unet(shipped_pixel_cfg())
            y = torch.arange(batch) % 11
            return net, lambda x: net(x, t, y)
        if key == "resnet50":
            net = ResNet50()
            return net, net
        if key in ("adm64", "adm256"):
            # 256x256_diffusion_uncond: attention_resolutions 32,16,8 -> ds 8,16,32; 64 head channels.
            net = AdmUNet(3, 256, 6, 2, [1, 1, 2, 2, 4, 4], [8, 16, 32], 64, label_rows=None)
            return net, lambda x: net(x, t)
        if key == "vgg16":
            net = Vgg16L2()
            return net, net
        if key == "ldm64":
            net = LdmUNet()
            ctx = (torch.rand(batch, 1, 512, generator=torch.Generator().manual_seed(5)) * 2 - 1)
            return net, lambda x: net(x, t, ctx)
        raise SystemExit(f"unknown network {key}")

    return torch, build


def randomise(torch, net, seed=0):
    """He-scaled uniform kernels/matrices (the twin zero-initialises some output convs, which
    would be unrepresentative); small random vectors except all-ones ones (norm scales, BN running
    variance). The same rule as the Rust example's weight filler."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in list(net.named_parameters()) + list(net.named_buffers()):
            if not p.is_floating_point() or p.numel() == 0:
                continue
            if p.dim() >= 2 and p.shape[1:].numel() > 0:
                std = math.sqrt(2.0 / p.shape[1:].numel())
            elif bool((p == 1).all()):
                continue
            else:
                std = 0.05
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * std * math.sqrt(3))


def median(v):
    """The element at len/2 of the sorted list, as the Rust side takes it."""
    return sorted(v)[len(v) // 2]


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def child(key, mode, threads, reps_scale):
    t_build = time.perf_counter()
    torch, build = models()
    torch.set_num_threads(threads)
    title, shape, _, min_reps, budget = NETS[key]
    net, f = build(key, shape[0])
    net.eval()
    randomise(torch, net)
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(99)
    x = torch.rand(shape, generator=g) * 2 - 1
    if key in ("resnet50", "vgg16"):
        x = (x + 1) * 0.5
    build_s = time.perf_counter() - t_build
    backward = mode == "fwdbwd"

    def call():
        if backward:
            xv = x.clone().requires_grad_(True)
            y = f(xv)
            y.backward(torch.ones_like(y))
            assert xv.grad is not None
        else:
            with torch.no_grad():
                f(x)

    # Same baseline rule as the Rust side: free heap pages back to the OS, then reset VmHWM.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        peak_ok = True
    except OSError:
        peak_ok = False
    base = status_kib("VmRSS:")
    t0 = time.perf_counter()
    call()
    warm_s = time.perf_counter() - t0
    min_reps = max(1, round(min_reps * reps_scale))
    budget *= reps_scale
    wall, cpu = [], []
    start = time.perf_counter()
    while len(wall) < min_reps or (time.perf_counter() - start < budget and len(wall) < 50):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    peak = (status_kib("VmHWM:") - base) / 1024 if peak_ok else None
    return {
        "impl": "torch", "net": key, "title": title, "mode": mode, "threads": threads,
        "reps": len(wall), "wall_ms": median(wall), "cpu_ms": median(cpu), "peak_delta_mib": peak,
        "base_rss_mib": base / 1024, "build_s": build_s, "warmup_s": warm_s,
        "torch": torch.__version__,
        # Parameters plus BN running statistics: what the Rust side counts as it fills weights.
        "params": sum(p.numel() for p in net.parameters())
        + sum(b.numel() for n, b in net.named_buffers() if "running_" in n),
        # OpenMP spin-waits at barriers by default; on an oversubscribed machine that burns CPU
        # time, so the setting in force is recorded with the numbers.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def op_cases(torch):
    """The per-op cases of crates/engine/examples/bench_ops.rs, same names and shapes, so the
    merge can put PyTorch next to the engine's and candle's numbers for each op."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0):
        return (torch.rand(shape, generator=g) * 2 - 1) * 1.7 * scale

    cases = []
    for bwd in (False, True):
        mode = "fwd+bwd" if bwd else "fwd"
        convs = [(1, 128, 128, 32, 3, 1), (8, 128, 128, 32, 3, 1), (8, 128, 128, 32, 3, 2),
                 (8, 256, 128, 16, 1, 1), (8, 3, 128, 32, 3, 1)]
        for shape in convs + ([(8, 128, 128, 32, 3, 1, "dW")] if bwd else []):
            b, cin, cout, hw, k, st = shape[:6]
            train = len(shape) == 7
            name = f"conv{k}x{k}/s{st} {cin}->{cout} {hw}² B={b}{' +dW' if train else ''} {mode}"
            ins = [rnd(b, cin, hw, hw), rnd(cout, cin, k, k, scale=0.05), rnd(cout)]
            cases.append((name, ins, [True, train, train],
                          lambda t, st=st, k=k: F.conv2d(t[0], t[1], t[2], st, k // 2), bwd))
        gn_ins = [rnd(8, 128, 32, 32), rnd(128), rnd(128)]
        cases.append((f"GroupNorm32 128c 32² B=8 {mode}", gn_ins, [True, False, False],
                      lambda t: F.group_norm(t[0], 32, t[1], t[2], 1e-6), bwd))
        cases.append((f"GroupNorm32+SiLU 128c 32² B=8 {mode}", gn_ins, [True, False, False],
                      lambda t: F.silu(F.group_norm(t[0], 32, t[1], t[2], 1e-6)), bwd))
        cases.append((f"SiLU 128c 32² B=8 {mode}", [rnd(8, 128, 32, 32)], [True],
                      lambda t: F.silu(t[0]), bwd))
        qkv = [rnd(8, 256, 128), rnd(8, 256, 128), rnd(8, 256, 128)]
        # The explicit form the ADM reference uses (QKVAttentionLegacy), not the fused SDPA.
        cases.append((f"attention 256tok d128 B=8 {mode}", qkv, [True, True, True],
                      lambda t: torch.softmax(t[0] @ t[1].transpose(1, 2) / math.sqrt(128), -1) @ t[2],
                      bwd))
        for b in (1, 8):
            ins = [rnd(b, 128, 32, 32), rnd(128, 128, 3, 3, scale=0.03), rnd(128), rnd(128), rnd(128)]

            def resblock(t):
                h = F.conv2d(F.silu(F.group_norm(t[0], 32, t[3], t[4], 1e-6)), t[1], t[2], 1, 1)
                h = F.conv2d(F.silu(F.group_norm(h, 32, t[3], t[4], 1e-6)), t[1], t[2], 1, 1)
                return h + t[0]

            cases.append((f"resblock 128c 32² B={b} {mode}", ins, [True] + [False] * 4, resblock, bwd))
    return cases


def ops_child(threads, budget):
    """bench_ops' timing rule: one warm-up, then calls until 3 and the budget; median wall,
    mean CPU per call."""
    import torch

    torch.set_num_threads(threads)
    for name, ins, track, f, bwd in op_cases(torch):
        def call():
            if bwd:
                t = [x.clone().requires_grad_(tr) for x, tr in zip(ins, track)]
                y = f(t)
                y.backward(torch.ones_like(y))
            else:
                with torch.no_grad():
                    f(ins)

        call()
        wall, cpu = [], 0.0
        start = time.perf_counter()
        while len(wall) < 3 or (time.perf_counter() - start < budget and len(wall) < 200):
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            cpu += time.process_time() - c0
            wall.append((time.perf_counter() - t0) * 1e3)
        print(json.dumps({"op": name, "threads": threads, "wall_ms": median(wall),
                          "cpu_ms": cpu * 1e3 / len(wall)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--reps-scale", type=float, default=1.0)
    ap.add_argument("--jsonl", help="append one JSON object per case")
    ap.add_argument("--ops", action="store_true",
                    help="per-op timings of bench_ops' cases instead (JSON lines on stdout)")
    ap.add_argument("--quick", action="store_true", help="with --ops: bench_ops' --quick budget")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ops:
        for thr in a.threads.split(","):
            env = dict(os.environ, OMP_NUM_THREADS=thr, MKL_NUM_THREADS=thr)
            budget = "0.05" if a.quick else "0.6"
            code = f"import sys; sys.path.insert(0, {HERE!r}); import bench_torch as b; b.ops_child({thr}, {budget})"
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
        return 0
    if a.child:
        key, mode, thr = a.child.split(":")
        print(json.dumps(child(key, mode, int(thr), a.reps_scale)))
        return 0
    print("f32, CPU, PyTorch. wall/cpu = median ms per call (cpu: process CPU time, all threads); "
          "peak = RSS high-water mark above the post-build baseline")
    print("| network | mode | thr | reps | wall ms | cpu ms | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for key in a.nets.split(","):
        if key not in NETS:
            raise SystemExit(f"unknown network {key}; known: {','.join(NETS)}")
        for thr in a.threads.split(","):
            for mode in a.modes.split(","):
                if mode == "fwdbwd" and not NETS[key][2]:
                    continue
                env = dict(os.environ, OMP_NUM_THREADS=thr, MKL_NUM_THREADS=thr)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", f"{key}:{mode}:{thr}",
                     "--reps-scale", str(a.reps_scale)],
                    env=env, capture_output=True, text=True,
                )
                if out.returncode:
                    raise SystemExit(f"case {key}:{mode}:{thr} failed:\n{out.stderr}")
                line = out.stdout.strip().splitlines()[-1]
                r = json.loads(line)
                peak = "n/a" if r["peak_delta_mib"] is None else f"{r['peak_delta_mib']:.1f}"
                print(f"| {r['title']} | {mode} | {thr} | {r['reps']} | {r['wall_ms']:.1f} | "
                      f"{r['cpu_ms']:.1f} | {peak} |", flush=True)
                if a.jsonl:
                    with open(a.jsonl, "a") as fh:
                        fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
