//! Per-op CPU benchmark: the engine's fast ops (`diffguard_engine::ops`) vs candle's reference ops,
//! in the same process, forward and forward+backward, at 1 and 2 threads.
//!
//! `cargo run --release -p diffguard-engine --example bench_ops [-- --quick] [--filter TEXT] [--no-mmap]`
//!
//! The rayon pool size is fixed at first use, so the parent re-runs itself once per thread count
//! with `RAYON_NUM_THREADS` set. Times: median wall time per call, and mean CPU time per call summed
//! over all threads of the process (clock_gettime; stable under machine load).
//! Ours and candle's calls alternate in rounds so load changes hit both alike.

#[path = "bench_common/clock.rs"]
mod clock;
use clock::cpu_ns;

use candle_core::{D, Device, Module, Result, Tensor, Var};
use diffguard_engine::ops::{activation, attention, conv, norm};
use std::time::Instant;

type Run = Box<dyn Fn() -> Result<()>>;
/// A benchmarked computation on its input tensors.
type Net = fn(&[Tensor]) -> Result<Tensor>;

struct Case {
    name: String,
    ours: Run,
    theirs: Run,
}

fn randn(dims: &[usize], seed: u64) -> Result<Tensor> {
    // A cheap deterministic fill; the values only need to be generic (not all equal).
    let n: usize = dims.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// Forward only (no autograd graph), or forward + backward w.r.t. the tracked inputs. The
/// backward is seeded with dL/dy = 1 (candle's `backward` on a non-scalar), so no extra loss op
/// is timed; the kernels do the same work whatever the seed.
fn case(
    name: &str,
    inputs: Vec<Tensor>,
    track: &[bool],
    ours: Net,
    theirs: Net,
    backward: bool,
) -> Result<Case> {
    let wrap = |f: Net| -> Result<Run> {
        let vars: Vec<Tensor> = inputs
            .iter()
            .zip(track)
            .map(|(t, &tr)| {
                if backward && tr {
                    Var::from_tensor(t).map(|v| v.as_tensor().clone())
                } else {
                    Ok(t.clone())
                }
            })
            .collect::<Result<_>>()?;
        Ok(Box::new(move || {
            let y = f(&vars)?;
            if backward {
                let g = y.backward()?;
                std::hint::black_box(g);
            } else {
                std::hint::black_box(y);
            }
            Ok(())
        }))
    };
    let mode = if backward { "fwd+bwd" } else { "fwd" };
    Ok(Case {
        name: format!("{name} {mode}"),
        ours: wrap(ours)?,
        theirs: wrap(theirs)?,
    })
}

/// (median wall ms, mean CPU ms) per call of each closure, alternating rounds.
fn measure(c: &Case, quick: bool) -> Result<[(f64, f64); 2]> {
    (c.ours)()?;
    (c.theirs)()?;
    let budget = if quick { 0.05 } else { 0.6 };
    let mut samples: [Vec<f64>; 2] = [vec![], vec![]];
    let mut cpu = [0u64; 2];
    let start = Instant::now();
    while samples[0].len() < 3 || (start.elapsed().as_secs_f64() < budget && samples[0].len() < 200)
    {
        for (i, f) in [&c.ours, &c.theirs].into_iter().enumerate() {
            let (t0, c0) = (Instant::now(), cpu_ns());
            f()?;
            cpu[i] += cpu_ns() - c0;
            samples[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok([0, 1].map(|i| {
        let s = &mut samples[i];
        s.sort_by(f64::total_cmp);
        (s[s.len() / 2], cpu[i] as f64 / 1e6 / s.len() as f64)
    }))
}

/// (batch, cin, cout, height = width, kernel, stride)
type ConvShape = (usize, usize, usize, usize, usize, usize);

fn conv_case((b, cin, cout, hw, k, s): ConvShape, bwd: bool, train: bool) -> Result<Case> {
    let name = format!(
        "conv{k}x{k}/s{s} {cin}->{cout} {hw}² B={b}{}",
        if train { " +dW" } else { "" }
    );
    let inputs = vec![
        randn(&[b, cin, hw, hw], 1)?,
        (randn(&[cout, cin, k, k], 2)? * 0.05)?,
        randn(&[cout], 3)?,
    ];
    fn ours3(t: &[Tensor]) -> Result<Tensor> {
        conv::conv2d(&t[0], &t[1], Some(&t[2]), 1, 1)
    }
    fn theirs3(t: &[Tensor]) -> Result<Tensor> {
        t[0].conv2d(&t[1], 1, 1, 1, 1)?
            .broadcast_add(&t[2].reshape((1, (), 1, 1))?)
    }
    fn ours3s2(t: &[Tensor]) -> Result<Tensor> {
        conv::conv2d(&t[0], &t[1], Some(&t[2]), 2, 1)
    }
    fn theirs3s2(t: &[Tensor]) -> Result<Tensor> {
        t[0].conv2d(&t[1], 1, 2, 1, 1)?
            .broadcast_add(&t[2].reshape((1, (), 1, 1))?)
    }
    fn ours1(t: &[Tensor]) -> Result<Tensor> {
        conv::conv2d(&t[0], &t[1], Some(&t[2]), 1, 0)
    }
    fn theirs1(t: &[Tensor]) -> Result<Tensor> {
        t[0].conv2d(&t[1], 0, 1, 1, 1)?
            .broadcast_add(&t[2].reshape((1, (), 1, 1))?)
    }
    let (o, t): (Net, Net) = match (k, s) {
        (3, 1) => (ours3, theirs3),
        (3, _) => (ours3s2, theirs3s2),
        _ => (ours1, theirs1),
    };
    case(&name, inputs, &[true, train, train], o, t, bwd)
}

fn gn_case(bwd: bool, silu: bool) -> Result<Case> {
    let inputs = vec![
        randn(&[8, 128, 32, 32], 4)?,
        randn(&[128], 5)?,
        randn(&[128], 6)?,
    ];
    fn ours(t: &[Tensor]) -> Result<Tensor> {
        norm::group_norm(&t[0], 32, &t[1], &t[2], 1e-6, false)
    }
    fn theirs(t: &[Tensor]) -> Result<Tensor> {
        candle_nn::GroupNorm::new(t[1].clone(), t[2].clone(), 128, 32, 1e-6)?.forward(&t[0])
    }
    fn ours_s(t: &[Tensor]) -> Result<Tensor> {
        norm::group_norm(&t[0], 32, &t[1], &t[2], 1e-6, true)
    }
    fn theirs_s(t: &[Tensor]) -> Result<Tensor> {
        theirs(t)?.silu()
    }
    let (name, o, t): (_, Net, Net) = if silu {
        ("GroupNorm32+SiLU 128c 32² B=8", ours_s, theirs_s)
    } else {
        ("GroupNorm32 128c 32² B=8", ours, theirs)
    };
    case(name, inputs, &[true, false, false], o, t, bwd)
}

fn silu_case(bwd: bool) -> Result<Case> {
    fn ours(t: &[Tensor]) -> Result<Tensor> {
        activation::silu(&t[0])
    }
    fn theirs(t: &[Tensor]) -> Result<Tensor> {
        t[0].silu()
    }
    case(
        "SiLU 128c 32² B=8",
        vec![randn(&[8, 128, 32, 32], 7)?],
        &[true],
        ours,
        theirs,
        bwd,
    )
}

fn attention_case(bwd: bool) -> Result<Case> {
    // The UNet stack's single-head attention at 16×16: 256 tokens of 128 features.
    let inputs = vec![
        randn(&[8, 256, 128], 8)?,
        randn(&[8, 256, 128], 9)?,
        randn(&[8, 256, 128], 10)?,
    ];
    fn ours(t: &[Tensor]) -> Result<Tensor> {
        attention::attention(&t[0], &t[1], &t[2], 1.0 / 128f64.sqrt())
    }
    fn theirs(t: &[Tensor]) -> Result<Tensor> {
        let s = (t[0].matmul(&t[1].t()?.contiguous()?)? / 128f64.sqrt())?;
        candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&t[2])
    }
    case(
        "attention 256tok d128 B=8",
        inputs,
        &[true, true, true],
        ours,
        theirs,
        bwd,
    )
}

/// GN+SiLU → conv3×3 → GN+SiLU → conv3×3 → +x at 128c 32² (a diffusion UNet ResNet block, no temb).
fn resblock_case(b: usize, bwd: bool) -> Result<Case> {
    let inputs = vec![
        randn(&[b, 128, 32, 32], 11)?,
        (randn(&[128, 128, 3, 3], 12)? * 0.03)?,
        randn(&[128], 13)?,
        randn(&[128], 14)?,
        randn(&[128], 15)?,
    ];
    fn ours(t: &[Tensor]) -> Result<Tensor> {
        let h = norm::group_norm(&t[0], 32, &t[3], &t[4], 1e-6, true)?;
        let h = conv::conv2d(&h, &t[1], Some(&t[2]), 1, 1)?;
        let h = norm::group_norm(&h, 32, &t[3], &t[4], 1e-6, true)?;
        conv::conv2d(&h, &t[1], Some(&t[2]), 1, 1)? + &t[0]
    }
    fn theirs(t: &[Tensor]) -> Result<Tensor> {
        let gn = candle_nn::GroupNorm::new(t[3].clone(), t[4].clone(), 128, 32, 1e-6)?;
        let conv = |h: &Tensor| {
            h.conv2d(&t[1], 1, 1, 1, 1)?
                .broadcast_add(&t[2].reshape((1, (), 1, 1))?)
        };
        let h = conv(&gn.forward(&t[0])?.silu()?)?;
        conv(&gn.forward(&h)?.silu()?)? + &t[0]
    }
    case(
        &format!("resblock 128c 32² B={b}"),
        inputs,
        &[true, false, false, false, false],
        ours,
        theirs,
        bwd,
    )
}

fn cases() -> Result<Vec<Case>> {
    let mut v = vec![];
    for bwd in [false, true] {
        v.push(conv_case((1, 128, 128, 32, 3, 1), bwd, false)?);
        v.push(conv_case((8, 128, 128, 32, 3, 1), bwd, false)?);
        v.push(conv_case((8, 128, 128, 32, 3, 2), bwd, false)?);
        v.push(conv_case((8, 256, 128, 16, 1, 1), bwd, false)?);
        v.push(conv_case((8, 3, 128, 32, 3, 1), bwd, false)?);
        if bwd {
            v.push(conv_case((8, 128, 128, 32, 3, 1), bwd, true)?);
        }
        v.push(gn_case(bwd, false)?);
        v.push(gn_case(bwd, true)?);
        v.push(silu_case(bwd)?);
        v.push(attention_case(bwd)?);
        v.push(resblock_case(1, bwd)?);
        v.push(resblock_case(8, bwd)?);
    }
    Ok(v)
}

fn child(threads: &str, quick: bool, filter: &str) -> Result<()> {
    for c in cases()?.into_iter().filter(|c| c.name.contains(filter)) {
        let [(ow, oc), (tw, tc)] = measure(&c, quick)?;
        println!(
            "| {:<38} | {threads} | {ow:>9.3} | {tw:>9.3} | {:>5.2}× | {oc:>9.3} | {tc:>9.3} | {:>5.2}× |",
            c.name,
            tw / ow,
            tc / oc
        );
    }
    Ok(())
}

/// `--no-mmap`: run with `diffguard_engine::malloc::keep_large_buffers`, as the `diffguard` binary
/// does (freed large blocks stay in the heap instead of being unmapped and re-faulted per tensor);
/// without it this bench measures glibc's stock behaviour.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--filter TEXT` keeps only the ops whose name contains TEXT.
    let filter = args
        .iter()
        .position(|a| a == "--filter")
        .and_then(|i| args.get(i + 1))
        .map_or("", String::as_str);
    if let Ok(t) = std::env::var("BENCH_OPS_CHILD") {
        if args.iter().any(|a| a == "--no-mmap") {
            diffguard_engine::malloc::keep_large_buffers();
        }
        return child(&t, quick, filter);
    }
    println!(
        "f32, CPU. wall = median wall ms/call; cpu = mean CPU ms/call over all threads; ratio = candle / ours"
    );
    println!("| op | thr | ours wall | candle wall | ratio | ours cpu | candle cpu | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe()?;
    for threads in ["1", "2"] {
        let status = std::process::Command::new(&exe)
            .args(&args[1..])
            .env("BENCH_OPS_CHILD", threads)
            .env("RAYON_NUM_THREADS", threads)
            .status()?;
        if !status.success() {
            candle_core::bail!("benchmark child with {threads} thread(s) failed: {status}")
        }
    }
    Ok(())
}
