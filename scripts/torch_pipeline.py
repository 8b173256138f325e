#!/usr/bin/env python3
"""The DiffGuard pixel-CFG pipeline in PyTorch, for the same-run comparison of issue 2.

`crates/engine/examples/bench_pipeline` runs the engine on the project's bundle and prints, per
recipe variant, the effective recipe, the speed and every image's score. This script runs the same
computation on the same weights (scripts/torch_twin.py's twins of the pixel UNet and the ResNet)
in one of two structures:

- `reference`: the way the official DiffGuard code is organised (spec §4.1, §5, §6): the inversion
  runs per loader batch; with adaptive early stop on, the denoising runs one image at a time
  ("denoise batch forced to 1"), since every image has its own start index; Clean Grad calls the
  UNet again for x̂0 instead of reusing the ε of the step (spec §5 step 1). This is the baseline
  the issue's "≥ 2× faster per image" target is stated against.
- `batched`: the engine's own structure (images with equal start index denoised together, ε
  reused), so that the ratio against it isolates the framework (kernels) from the algorithm.

Both structures give the same numbers as the engine up to float rounding; `table` checks that
(scores, k*, labels) while it builds the ratio table, so the bench is also an end-to-end parity
test of the whole pipeline against an independent implementation.

  torch_pipeline.py run --case JSON_LINE_FILE --structure reference|batched [--threads 1]
                        [--device cpu|cuda] ...
  torch_pipeline.py table --ours ours.jsonl --torch torch.jsonl [--clock cpu|wall] [--out FILE.md]

On a GPU (`--device cuda`, beside the engine's `bench_pipeline --device cuda`) compare wall time
(`table --clock wall`): the host's CPU time then mostly measures kernel launches and waiting.

Requires torch, numpy, safetensors (scripts/bench_vs_torch.sh documents the venv).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import median, status_kib  # noqa: E402  (the network bench's rules)
from torch_twin import SmallResNet, pixel_unet, read_idx  # noqa: E402


# ---- schedule and DDIM (spec §2-§4), float64 coefficients applied as scalars ------------------


def gdm_schedule(num_timesteps, steps):
    """guided-diffusion's SpacedDiffusion for "ddimN" on the ADM linear betas."""
    scale = 1000.0 / num_timesteps
    full = np.cumprod(1.0 - np.linspace(scale * 1e-4, scale * 0.02, num_timesteps))
    stride = next(k for k in range(1, num_timesteps) if -(-num_timesteps // k) == steps)
    ts = list(range(0, num_timesteps, stride))
    last, betas = 1.0, []
    for t in ts:
        betas.append(1.0 - full[t] / last)
        last = full[t]
    ac = np.cumprod(1.0 - np.array(betas))
    prev = np.concatenate([[1.0], ac[:-1]])
    nxt = np.concatenate([ac[1:], [0.0]])
    return ts, ac, prev, nxt


def pred_x0(x, eps, a):
    return x * float(np.sqrt(1 / a)) - eps * float(np.sqrt(1 / a - 1))


def eps_from_x0(x, x0, a):
    return (x * float(np.sqrt(1 / a)) - x0) * float(1 / np.sqrt(1 / a - 1))


def to_level(x0, eps, a_to):
    return x0 * float(np.sqrt(a_to)) + eps * float(np.sqrt(1 - a_to))


def clipped_eps(x, eps, a):
    return eps_from_x0(x, pred_x0(x, eps, a).clamp(-1, 1), a)


def psnr_code(a, b):
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    return 20 * torch.log10(255 / mse.sqrt())


def start_index(k, n, fsd):
    skip = max(0, n - (k + fsd))
    return max(0, n - 1 - skip)


# ---- the pipeline ---------------------------------------------------------------------------


class Pipeline:
    def __init__(self, bundle_dir, recipe, structure, device="cpu"):
        self.dev = torch.device(device)
        man = json.load(open(os.path.join(bundle_dir, "bundle.json")))
        self.cfg = man["denoiser"]["pixel_unet"]
        self.unet = pixel_unet(self.cfg).eval()
        self.unet.load_state_dict(load_file(os.path.join(bundle_dir, man["denoiser"]["weights"])))
        self.unet.to(self.dev)
        self.clf = SmallResNet(man["classifier"]["resnet"]).eval()
        self.clf.load_state_dict(load_file(os.path.join(bundle_dir, man["classifier"]["weights"])),
                                 strict=False)
        self.clf.to(self.dev)
        for p in list(self.unet.parameters()) + list(self.clf.parameters()):
            p.requires_grad_(False)
        self.r = recipe
        if recipe["preset"] != "pixel-cfg" or recipe["use_cam"] or recipe["cutouts_num"] > 0 \
                or recipe["reference"] != "input" or recipe["distance"] != "logits-l1" \
                or recipe["input_size"] != recipe["image_size"] or recipe["no_x0_hat"]:
            raise SystemExit("torch_pipeline.py covers pixel-cfg without DSG mask, cutouts or "
                             "resizing, scored by logits-L1 against the input")
        self.ts, self.ac, self.prev, self.nxt = gdm_schedule(recipe["diffusion_steps"],
                                                             recipe["ddim_steps"])
        self.null = self.cfg["num_classes"]
        self.structure = structure
        self.aes = recipe["early_stop"]["psnr"] >= 0
        self.nfe = None

    def eps(self, x, t, labels):
        self.nfe["denoiser"] += len(labels)
        tt = torch.full((len(labels),), t, dtype=torch.long, device=self.dev)
        return self.unet(x, tt, torch.tensor(labels, dtype=torch.long, device=self.dev))

    def cfg_eps(self, x, t, labels):
        g = len(labels)
        e = self.eps(torch.cat([x, x]), t, [self.null] * g + labels)
        eu, ey = e[:g], e[g:]
        return eu + (ey - eu) * float(self.r["guidance_scale"])

    def clean_grad(self, x, eps, a, labels):
        """Spec §5: blend of the unclipped x̂0 and x, gradient of Σ log-softmax[y] w.r.t. it."""
        g = float(np.sqrt(1 - a))
        blend = pred_x0(x, eps, a) * g + x * (1 - g)
        u = (blend * 0.5 + 0.5).detach().requires_grad_(True)
        with torch.enable_grad():
            self.nfe["classifier_backward"] += len(labels)
            lp = F.log_softmax(self.clf(u), dim=1)
            lp.gather(1, torch.tensor(labels, device=self.dev).view(-1, 1)).sum().backward()
        return u.grad * (0.5 * float(self.r["classifier_scale"]))

    def invert(self, x0):
        """GDM inversion (§3.1) with adaptive early stop (§6); stopped images leave the batch."""
        n, J = len(x0), self.r["ddim_steps"] - self.r["early_stop_steps"]
        active, x, x0_act = list(range(n)), x0, x0
        z, k_star = [None] * n, [J - 1] * n
        for j in range(J):
            eps = self.eps(x, self.ts[j], [self.null] * len(active))
            if self.r["clip_denoised"] and j > 0:
                eps = clipped_eps(x, eps, self.ac[j])
            x = to_level(pred_x0(x, eps, self.ac[j]), eps, self.nxt[j])
            if not self.aes:
                continue
            stop = (psnr_code(x, x0_act) < self.r["early_stop"]["psnr"]).tolist()
            keep = [r for r, s in enumerate(stop) if not s]
            for r, s in enumerate(stop):
                if s:
                    z[active[r]], k_star[active[r]] = x[r], j
            if not keep:
                active = []
                break
            x, x0_act = x[keep], x0_act[keep]
            active = [active[r] for r in keep]
        for r, i in enumerate(active):
            z[i] = x[r]
        return torch.stack(z), k_star

    def denoise(self, z, start, labels):
        x = z
        for j in range(start, -1, -1):
            t, a, a_prev = self.ts[j], self.ac[j], self.prev[j]
            eps = self.cfg_eps(x, t, labels)
            grad = None
            if self.r["classifier_scale"] != 0:
                # The official code's cond_fn recomputes the model output for x̂0 (spec §5).
                e_x0 = eps if self.structure == "batched" else self.cfg_eps(x, t, labels)
                grad = self.clean_grad(x, e_x0, a, labels)
            if self.r["clip_denoised"]:
                eps = clipped_eps(x, eps, a)
            if grad is not None:
                eps = eps - grad * float(np.sqrt(1 - a))
            x0 = pred_x0(x, eps, a)
            x = to_level(x0, eps_from_x0(x, x0, a), a_prev)
        return x

    @torch.no_grad()
    def score(self, x):
        n = len(x)
        self.nfe = {"denoiser": 0, "classifier_forward": n, "classifier_backward": 0}
        logits_in = self.clf(((x + 1) / 2).clamp(0, 1))
        labels = logits_in.argmax(1).tolist()
        z, k_star = self.invert(x)
        starts = [start_index(k, self.r["ddim_steps"], self.r["forback_skip_diff"]) for k in k_star]
        synth = [None] * n
        if self.structure == "reference" and self.aes:
            groups = [(starts[i], [i]) for i in range(n)]
        else:
            groups = {}
            for i, s in enumerate(starts):
                groups.setdefault(s, []).append(i)
            groups = sorted(groups.items())
        for start, idx in groups:
            out = self.denoise(z[idx], start, [labels[i] for i in idx])
            for r, i in enumerate(idx):
                synth[i] = out[r]
        synth = torch.stack(synth)
        self.nfe["classifier_forward"] += n
        logits_syn = self.clf(((synth + 1) / 2).clamp(0, 1))
        scores = (-(logits_in - logits_syn).abs().sum(1)).double().tolist()
        return scores, k_star, labels, {k: v / n for k, v in self.nfe.items()}


def run(args):
    case = json.loads(open(args.case).read().splitlines()[args.line])
    threads = args.threads or case["threads"]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # PyTorch runs convolutions on NVIDIA GPUs in TF32 (10-bit mantissa) unless told otherwise;
    # the engine computes in full f32, so the parity columns would measure TF32's error.
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    pipe = Pipeline(args.bundle, case["recipe"], args.structure, args.device)
    images = read_idx(os.path.join(args.data, "fashion-mnist", "t10k-images-idx3-ubyte.gz"))
    x = torch.from_numpy(images[:case["images"]].astype(np.float32) / 255 * 2 - 1).unsqueeze(1)
    x = x.to(pipe.dev)
    batch = case["batch"]
    try:  # resets the peak RSS; some sandboxes refuse it, and the peak then spans the whole run
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = status_kib("VmRSS:")
    t = time.time()
    pipe.score(x[:batch])
    warm = time.time() - t
    cpu, wall = [], []
    for _ in range(args.reps or case["reps"]):
        c0, w0 = time.process_time(), time.time()
        res = [pipe.score(x[i:i + batch]) for i in range(0, len(x), batch)]
        cpu.append((time.process_time() - c0) * 1e3 / len(x))
        wall.append((time.time() - w0) * 1e3 / len(x))
    nfe = {k: sum(r[3][k] * len(r[0]) for r in res) / len(x) for k in res[0][3]}
    out = {"impl": "torch", "structure": args.structure, "variant": case["variant"],
           "name": case["name"], "threads": threads, "images": len(x), "batch": batch,
           "reps": len(cpu), "cpu_ms_per_image": median(cpu),
           "wall_ms_per_image": median(wall), "warmup_s": warm,
           "peak_delta_mib": (status_kib("VmHWM:") - base) / 1024, "nfe": nfe,
           "torch": torch.__version__, "device": args.device, "tf32": args.tf32,
           "labels": [l for r in res for l in r[2]], "k_star": [k for r in res for k in r[1]],
           "scores": [s for r in res for s in r[0]]}
    print(json.dumps(out))


# ---- the table ------------------------------------------------------------------------------


def agreement(a, b):
    """Largest |Δscore| relative to the score spread, k* and label mismatches."""
    sa, sb = np.array(a["scores"]), np.array(b["scores"])
    spread = float(np.std(sa)) or 1.0
    return (float(np.max(np.abs(sa - sb))) / spread,
            sum(x != y for x, y in zip(a["k_star"], b["k_star"])),
            sum(x != y for x, y in zip(a["labels"], b["labels"])))


def nfe_str(r):
    n = r["nfe"]
    return f"{n['denoiser']:.1f} / {n['classifier_forward']:.1f} / {n['classifier_backward']:.1f}"


def table(args):
    ours = [json.loads(l) for l in open(args.ours) if l.strip()]
    theirs = [json.loads(l) for l in open(args.torch) if l.strip()]
    lines = [
        "| variant | thr | engine ms/img | torch reference ms/img | speed-up vs reference | "
        "torch batched ms/img | speed-up vs batched | NFE/img engine (UNet / clf fwd / clf bwd) | "
        "NFE/img reference | peak MiB engine / reference | engine vs reference: max Δscore / σ, "
        "k* ≠, label ≠ | torch batched vs reference: max Δscore / σ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in ours:
        key = (o["variant"], o["threads"])
        ref = next((t for t in theirs if (t["variant"], t["threads"]) == key
                    and t["structure"] == "reference"), None)
        bat = next((t for t in theirs if (t["variant"], t["threads"]) == key
                    and t["structure"] == "batched"), None)
        if ref is None:
            continue
        clock = f"{args.clock}_ms_per_image"
        ms = o[clock]
        d, kd, ld = agreement(o, ref)
        bat_ms = f"{bat[clock]:.1f}" if bat else "—"
        bat_x = f"{bat[clock] / ms:.2f}×" if bat else "—"
        floor = f"{agreement(bat, ref)[0]:.1e}" if bat else "—"
        lines.append(
            f"| {o['name']} | {o['threads']} | {ms:.1f} | {ref[clock]:.1f} | "
            f"**{ref[clock] / ms:.2f}×** | {bat_ms} | {bat_x} | {nfe_str(o)} | "
            f"{nfe_str(ref)} | {o['peak_delta_mib']:.0f} / {ref['peak_delta_mib']:.0f} | "
            f"{d:.1e}, {kd}, {ld} | {floor} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one case of the engine's jsonl in PyTorch")
    r.add_argument("--case", required=True, help="bench_pipeline --jsonl output")
    r.add_argument("--line", type=int, default=0, help="which line (case) of that file")
    r.add_argument("--structure", choices=["reference", "batched"], default="reference")
    r.add_argument("--threads", type=int, default=0, help="0 = the engine case's")
    r.add_argument("--reps", type=int, default=0, help="passes (0 = as many as the engine's)")
    r.add_argument("--bundle", default="models/fashion-mnist")
    r.add_argument("--data", default=os.environ.get("DIFFGUARD_DATA") or "data")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    r.add_argument("--tf32", action="store_true",
                   help="allow TF32 on the GPU (PyTorch's default for convolutions)")
    t = sub.add_parser("table", help="merge engine and torch jsonl into the ratio table")
    t.add_argument("--ours", required=True)
    t.add_argument("--torch", required=True)
    t.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="which time per image the ratios use (wall on a GPU)")
    t.add_argument("--out")
    args = ap.parse_args()
    return run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())
