//! Whole-network CPU benchmark of the engine (f32, release): the networks of issues 3 and 4 at the
//! sizes the detector runs them, forward (no autograd graph) and forward+backward w.r.t. the input
//! only (weights are plain tensors, so nothing else is differentiated — what Clean Grad needs).
//! `scripts/bench_torch.py` runs the same networks in PyTorch; `scripts/bench_vs_torch.sh` runs
//! both, interleaved case by case, and writes the ratio table.
//!
//! `cargo run --release -p diffguard-engine --example bench_networks --
//!     [--nets unet-stack,pixel-ddpm,resnet50,adm64,vgg16,adm256,ldm64] [--threads 1,2]
//!     [--modes fwd,fwdbwd] [--glibc-defaults]
//!     [--reps-scale F] [--jsonl PATH]`
//!
//! Every (network, threads, mode) runs in a fresh child process: the rayon pool size is fixed at
//! first use, and the peak-RSS delta must not see memory an earlier case left in the allocator.
//! Per case: build the model (deterministic random weights) and input, reset the RSS high-water
//! mark, one warm-up call, then timed calls until both a minimum count and a time budget are met.
//! Reported: median wall ms and median process CPU ms per call (all threads; stable under machine
//! load where wall time is not), and peak RSS above the post-build baseline (activations,
//! gradients, scratch; the weights are excluded). Children tune malloc as the `diffguard` binary
//! does (`diffguard_engine::malloc`); `--glibc-defaults` measures glibc's stock behaviour.

#[path = "bench_common/child.rs"]
mod child;
#[path = "bench_common/cli.rs"]
mod cli;
#[path = "bench_common/clock.rs"]
mod clock;
#[path = "bench_common/rss.rs"]
mod rss;
use child::{append_line, run_child};
use cli::{flag_value, median};
use clock::cpu_ns;
use rss::{peak_delta_mib, reset_peak_rss, status_kib};

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use diffguard_engine::models::adm_unet::{
    AdmUNet, AdmUNetConfig, AttentionBlock, ContextLayer, UNetModel, UNetSpec,
};
use diffguard_engine::models::ldm_unet::{LdmUNet, LdmUNetConfig};
use diffguard_engine::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use diffguard_engine::models::resnet::{ResNet, ResNetConfig};
use diffguard_engine::models::vgg::{Vgg16Features, VggConfig};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Forward = Box<dyn Fn(&Tensor) -> Res<Tensor>>;

/// One benchmarked network: its input shape, whether a backward is meaningful, and how long to
/// sample it (big networks get fewer calls so the whole comparison fits ~20 min on 2 cores).
struct NetSpec {
    key: &'static str,
    title: &'static str,
    input: &'static [usize],
    backward: bool,
    min_reps: usize,
    budget_s: f64,
}

const NETS: &[NetSpec] = &[
    NetSpec {
        key: "unet-stack",
        title: "UNet stack 128c 32² (issue 4) B=8",
        input: &[8, 3, 32, 32],
        backward: true,
        min_reps: 3,
        budget_s: 4.0,
    },
    NetSpec {
        key: "pixel-ddpm",
        title: "pixel DDPM (shipped) 28² B=16",
        input: &[16, 1, 28, 28],
        backward: true,
        min_reps: 5,
        budget_s: 3.0,
    },
    NetSpec {
        key: "resnet50",
        title: "ResNet-50 224² B=1",
        input: &[1, 3, 224, 224],
        backward: true,
        min_reps: 5,
        budget_s: 3.0,
    },
    NetSpec {
        key: "adm64",
        title: "ADM-256 widths at 64² B=1",
        input: &[1, 3, 64, 64],
        backward: true,
        min_reps: 3,
        budget_s: 4.0,
    },
    NetSpec {
        key: "vgg16",
        title: "VGG16 features (L2 pool) 224² B=1",
        input: &[1, 3, 224, 224],
        backward: false,
        min_reps: 3,
        budget_s: 3.0,
    },
    NetSpec {
        key: "adm256",
        title: "ADM-256 uncond at 256² B=1",
        input: &[1, 3, 256, 256],
        backward: false,
        min_reps: 2,
        budget_s: 0.0,
    },
    NetSpec {
        key: "ldm64",
        title: "LDM cin256-v2 UNet, 64² latent B=1",
        input: &[1, 3, 64, 64],
        backward: false,
        min_reps: 3,
        budget_s: 4.0,
    },
];

/// Deterministic weights without a VarMap: plain tensors (not `Var`s), so a backward
/// differentiates w.r.t. the input only and the ResNet folds its eval BatchNorms as it does for a
/// checkpoint. Matrices/kernels get He-scaled uniform values (generic, no zeros or denormals);
/// constant hints other than 0 (norm scales, BN running variance) are kept.
struct Fill;

/// Elements handed out by [`Fill`]: the parameter count (with BN running statistics), reported so
/// that a mismatch with the PyTorch definition of the same network shows.
static FILLED: AtomicUsize = AtomicUsize::new(0);

fn lcg_fill(n: usize, seed: u64, half_width: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
        })
        .collect()
}

impl SimpleBackend for Fill {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        FILLED.fetch_add(s.elem_count(), Ordering::Relaxed);
        if let Init::Const(c) = h
            && c != 0.0
        {
            return Tensor::full(c as f32, s, dev)?.to_dtype(dtype);
        }
        let dims = s.dims();
        let std = if dims.len() >= 2 {
            (2.0 / dims[1..].iter().product::<usize>() as f32).sqrt()
        } else {
            0.05
        };
        let mut hasher = DefaultHasher::new();
        name.hash(&mut hasher);
        let v = lcg_fill(s.elem_count(), hasher.finish(), std * 3f32.sqrt());
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("bench weights are generated from a shape; none given for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn vb() -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Fill), DType::F32, Device::Cpu)
}

/// The shipped pixel DDPM's config, read from the bundle so the bench follows what ships.
fn shipped_pixel_config() -> Res<PixelUNetConfig> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../models/fashion-mnist/bundle.json"
    );
    let bundle: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    Ok(serde_json::from_value(
        bundle["denoiser"]["pixel_unet"].clone(),
    )?)
}

fn build(key: &str, batch: usize) -> Res<Forward> {
    let t = vec![500u32; batch];
    Ok(match key {
        "unet-stack" => {
            // Issue 4's "small UNet stack": the ADM skeleton at 128 channels, two 2-ResBlock
            // levels (32² and 16²), single-head attention at 16² (256 tokens × 128, the shape
            // bench_ops times), scale-shift norm, unconditional.
            let spec = UNetSpec {
                in_channels: 3,
                model_channels: 128,
                out_channels: 3,
                num_res_blocks: 2,
                channel_mult: vec![1, 1],
                attention_ds: vec![2],
                use_scale_shift_norm: true,
                resblock_updown: true,
                conv_resample: true,
                label_rows: None,
            };
            let factory =
                |vb: VarBuilder, ch: usize| -> diffguard_engine::Result<Box<dyn ContextLayer>> {
                    Ok(Box::new(AttentionBlock::new(vb, ch, 1)?))
                };
            let net = UNetModel::new(vb(), spec, &factory)?;
            Box::new(move |x| Ok(net.forward(x, &t, None, None, None)?))
        }
        "pixel-ddpm" => {
            let net = PixelUNet::new(vb(), shipped_pixel_config()?)?;
            let labels: Vec<u32> = (0..batch as u32).map(|i| i % 11).collect();
            Box::new(move |x| Ok(net.forward(x, &t, &labels)?))
        }
        "resnet50" => {
            let net = ResNet::new(vb(), &ResNetConfig::resnet50(1000))?;
            Box::new(move |x| Ok(net.forward_t(x, false)?.logits))
        }
        "adm64" | "adm256" => {
            let net = AdmUNet::new(vb(), AdmUNetConfig::imagenet256_uncond())?;
            Box::new(move |x| Ok(net.forward(x, &t, None)?))
        }
        "vgg16" => {
            let net = Vgg16Features::new(vb(), &VggConfig::default())?;
            Box::new(move |x| {
                let mut stages = net.forward_stages(x)?;
                Ok(stages.pop().ok_or("VGG16 returned no stages")?)
            })
        }
        "ldm64" => {
            let net = LdmUNet::new(vb(), LdmUNetConfig::cin256_v2())?;
            let ctx =
                Tensor::from_vec(lcg_fill(batch * 512, 5, 1.0), (batch, 1, 512), &Device::Cpu)?;
            Box::new(move |x| Ok(net.forward(x, &t, &ctx)?))
        }
        other => return Err(format!("unknown network {other}").into()),
    })
}

fn child(key: &str, mode: &str, threads: &str, reps_scale: f64) -> Res<String> {
    let net = NETS
        .iter()
        .find(|n| n.key == key)
        .ok_or_else(|| format!("unknown network {key}"))?;
    let backward = mode == "fwdbwd";
    let t_build = Instant::now();
    let f = build(key, net.input[0])?;
    let n: usize = net.input.iter().product();
    let x = Tensor::from_vec(lcg_fill(n, 99, 1.0), net.input, &Device::Cpu)?;
    // Images in [0, 1] for the classifiers, ~N(0,1)-scaled noise for the denoisers; the value
    // range does not change the work.
    let x = if key == "resnet50" || key == "vgg16" {
        ((x + 1.0)? * 0.5)?
    } else {
        x
    };
    let build_s = t_build.elapsed().as_secs_f64();
    let call = || -> Res<()> {
        if backward {
            let xv = Var::from_tensor(&x)?;
            let y = f(xv.as_tensor())?;
            let grads = y.backward()?;
            let gx = grads.get(xv.as_tensor()).ok_or("no input gradient")?;
            std::hint::black_box(gx);
        } else {
            std::hint::black_box(f(&x)?);
        }
        Ok(())
    };
    // Hand the builder's freed temporaries (e.g. BN folding) back to the OS first, so the
    // baseline holds the weights and input only and the timed calls cannot hide in that slack.
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let peak_ok = reset_peak_rss();
    let base_kib = status_kib("VmRSS:");
    let t_warm = Instant::now();
    call()?;
    let warm_s = t_warm.elapsed().as_secs_f64();
    let min_reps = ((net.min_reps as f64 * reps_scale).round() as usize).max(1);
    let budget = net.budget_s * reps_scale;
    let (mut wall, mut cpu) = (vec![], vec![]);
    let start = Instant::now();
    while wall.len() < min_reps || (start.elapsed().as_secs_f64() < budget && wall.len() < 50) {
        let (t0, c0) = (Instant::now(), cpu_ns());
        call()?;
        cpu.push((cpu_ns() - c0) as f64 / 1e6);
        wall.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let peak_mib = peak_delta_mib(peak_ok, base_kib).map_or("null".into(), |m| format!("{m:.1}"));
    Ok(format!(
        concat!(
            r#"{{"impl":"ours","net":"{}","title":"{}","mode":"{}","threads":{},"reps":{},"#,
            r#""wall_ms":{:.3},"cpu_ms":{:.3},"peak_delta_mib":{},"base_rss_mib":{:.1},"#,
            r#""build_s":{:.2},"warmup_s":{:.3},"params":{}}}"#
        ),
        key,
        net.title,
        mode,
        threads,
        wall.len(),
        median(&mut wall),
        median(&mut cpu),
        peak_mib,
        base_kib as f64 / 1024.0,
        build_s,
        warm_s,
        FILLED.load(Ordering::Relaxed)
    ))
}

fn arg_list<'a>(args: &'a [String], flag: &str, default: &'a str) -> Vec<&'a str> {
    flag_value(args, flag)
        .unwrap_or(default)
        .split(',')
        .filter(|s| !s.is_empty())
        .collect()
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps_scale: f64 = arg_list(&args, "--reps-scale", "1")[0].parse()?;
    if let Ok(case) = std::env::var("BENCH_NETWORKS_CHILD") {
        // As the diffguard binary runs them, unless glibc's defaults are asked for.
        if !args.iter().any(|a| a == "--glibc-defaults") {
            diffguard_engine::malloc::keep_large_buffers();
        }
        let parts: Vec<&str> = case.split(':').collect();
        let [key, mode, threads] = parts[..] else {
            return Err(format!("bad child case {case}").into());
        };
        println!("{}", child(key, mode, threads, reps_scale)?);
        return Ok(());
    }
    let all: Vec<&str> = NETS.iter().map(|n| n.key).collect();
    let all = all.join(",");
    let nets = arg_list(&args, "--nets", &all);
    let threads = arg_list(&args, "--threads", "1,2");
    let modes = arg_list(&args, "--modes", "fwd,fwdbwd");
    let jsonl = flag_value(&args, "--jsonl");
    println!(
        "f32, CPU, engine. wall/cpu = median ms per call (cpu: process CPU time, all threads); \
         peak = RSS high-water mark above the post-build baseline"
    );
    println!("| network | mode | thr | reps | wall ms | cpu ms | peak MiB |");
    println!("|---|---|---|---|---|---|---|");
    for key in &nets {
        let net = NETS
            .iter()
            .find(|n| n.key == *key)
            .ok_or_else(|| format!("unknown network {key}; known: {all}"))?;
        for thr in &threads {
            for mode in &modes {
                if *mode == "fwdbwd" && !net.backward {
                    continue;
                }
                let case = format!("{key}:{mode}:{thr}");
                let (line, v) = run_child(&args[1..], "BENCH_NETWORKS_CHILD", &case, thr)?;
                let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| {} | {mode} | {thr} | {} | {:.1} | {:.1} | {:.1} |",
                    net.title,
                    v["reps"],
                    num("wall_ms"),
                    num("cpu_ms"),
                    num("peak_delta_mib")
                );
                if let Some(path) = jsonl {
                    append_line(path, &line)?;
                }
            }
        }
    }
    Ok(())
}
