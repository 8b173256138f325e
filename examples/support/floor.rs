//! What the benchmark floors (`hyper_floor`, `tokio_floor`) share: their command line, and the
//! thread layout of the guard (`src/server.rs`): one single-threaded Tokio runtime per I/O thread,
//! all accepting from one listening socket, so that a floor differs from the guard in what it does
//! per request, not in how it is scheduled.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use http::Uri;
use tokio::net::{TcpListener, TcpStream};

/// A benchmark floor: a pass-through proxy with no guard, on the guard's thread layout.
#[derive(Parser)]
pub struct Args {
    /// Listen address.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Upstream base URL (`http://host:port`); request paths are kept.
    #[arg(long)]
    pub upstream: Uri,
    /// I/O threads; 0 = one per CPU.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Serves `listen` on `threads` threads (0 = one per CPU) until the process ends. `make` runs once
/// per thread and gives that thread's connection handler (and with it any per-thread state, such
/// as an upstream connection pool); each accepted connection runs as a task of that thread.
pub fn serve_per_core<M, H, F>(listen: SocketAddr, threads: usize, make: M) -> anyhow::Result<()>
where
    M: Fn() -> H,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let mut handles = Vec::with_capacity(threads);
    for _ in 0..threads {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let own = {
            let _in_runtime = runtime.enter();
            TcpListener::from_std(listener.try_clone()?)?
        };
        let handler = make();
        handles.push(std::thread::spawn(move || {
            runtime.block_on(accept_loop(own, handler))
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

async fn accept_loop<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: give connections time to close.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handler(stream));
    }
}
