//! `diffguard`: the guard binary.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use diffguard::config::Config;
use diffguard::guard::build_detector;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// DiffGuard guard: a reverse proxy that flags out-of-distribution images in front of a REST
/// image classifier.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the guard.
    Serve {
        /// TOML config file; without it the embedded default runs (in-process cache, one
        /// TorchServe-style route to 127.0.0.1:8081, the bundled models). Keys can be overridden
        /// with DIFFGUARD_<SECTION>__<KEY> variables, e.g. DIFFGUARD_CACHE__REDIS__URL.
        #[arg(long, env = "DIFFGUARD_CONFIG")]
        config: Option<PathBuf>,
        /// Proxy listen address (overrides server.listen).
        #[arg(long, env = "DIFFGUARD_LISTEN")]
        listen: Option<String>,
        /// Ops listen address for /healthz, /readyz, /metrics, /openapi.json (overrides server.ops_listen).
        #[arg(long, env = "DIFFGUARD_OPS_LISTEN")]
        ops_listen: Option<String>,
        /// Only load and validate the config, print it (secrets redacted) and exit.
        #[arg(long, env = "DIFFGUARD_CHECK_CONFIG")]
        check: bool,
    },
    /// Start the example upstream and the guard on loopback, send the bundled images through, print
    /// a verdict table and exit.
    Demo {
        /// How long the guard waits for each verdict (flag policy), milliseconds.
        #[arg(long, env = "DIFFGUARD_DEMO_WAIT_MS", default_value_t = 30_000)]
        wait_ms: u64,
    },
    /// Print the OpenAPI document of the verdict and ops endpoints.
    Openapi,
    /// Evaluate every detector (baselines, DiffGuard variants, combinations) on Fashion-MNIST vs OOD sets.
    Eval(diffguard::cli::eval::EvalArgs),
    /// Set global and per-class thresholds on the validation split at a target false-reject rate.
    Calibrate(diffguard::cli::calibrate::CalibrateArgs),
    /// List the weight files a recipe needs, where they are looked for, what is found and where
    /// to download each; `models fetch` downloads the missing ones.
    Models(diffguard::cli::models::ModelsArgs),
    /// Train the classifier or the diffusion prior on Fashion-MNIST (resumable: rerun to continue).
    #[command(subcommand)]
    Train(diffguard::cli::train::TrainCommand),
}

fn main() -> std::process::ExitCode {
    // Before any network runs; it leaves glibc's own MALLOC_* variables in charge when set.
    diffguard_engine::malloc::keep_large_buffers();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("diffguard: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("diffguard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            ops_listen,
            check,
        } => {
            let mut cfg = Config::load(config.as_deref())?;
            if let Some(l) = listen {
                cfg.server.listen = l;
            }
            if let Some(l) = ops_listen {
                cfg.server.ops_listen = l;
            }
            if check {
                println!("{}", cfg.redacted_toml());
                return Ok(());
            }
            serve(cfg).await
        }
        Command::Demo { wait_ms } => demo(wait_ms).await,
        Command::Eval(a) => {
            tokio::task::spawn_blocking(move || diffguard::cli::eval::run(a)).await?
        }
        Command::Calibrate(a) => {
            tokio::task::spawn_blocking(move || diffguard::cli::calibrate::run(a)).await?
        }
        Command::Train(cmd) => {
            tokio::task::spawn_blocking(move || diffguard::cli::train::run(cmd)).await?
        }
        Command::Models(args) => {
            tokio::task::spawn_blocking(move || diffguard::cli::models::run(&args)).await?
        }
        Command::Openapi => {
            println!(
                "{}",
                serde_json::to_string_pretty(&diffguard::ops::openapi())?
            );
            Ok(())
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let telemetry = diffguard::telemetry::init(&cfg.telemetry)?;
    tracing::info!(config = %cfg.redacted_toml(), otlp = telemetry.exporting(), "starting");
    let detector = build_detector(&cfg.detector)?;
    if !detector.ready() {
        tracing::warn!(detector = %detector.fingerprint(), "detector not ready: verdicts will be `unverified`");
    }
    let server = diffguard::server::start(&cfg, detector).await?;
    diffguard::server::shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    server.shutdown().await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(())
}

async fn demo(wait_ms: u64) -> anyhow::Result<()> {
    let cfg = Config::load(None)?;
    let detector: Arc<dyn diffguard::guard::Detector> = build_detector(&cfg.detector)?;
    let classifier = diffguard::upstream::default_classifier();
    let about = classifier.describe();
    let rows = diffguard::demo::run(detector.clone(), classifier, wait_ms).await?;
    println!("{}", diffguard::demo::table(&rows));
    println!("classifier: {about}; detector: {}", detector.fingerprint());
    Ok(())
}
