//! Open-loop HTTP load at a fixed request rate, for latency percentiles that closed-loop tools
//! (wrk) cannot give: requests go out on schedule whether or not earlier ones have been
//! answered, so a stalled server is charged for every request it delays (no coordinated
//! omission). Latency runs from the moment a request is sent; the sender's own lateness against
//! the schedule (tokio's timer ticks in milliseconds) is reported apart as `lag_p99_us`, so a
//! slow generator shows instead of hiding in the latencies. Loopback only; bounded by
//! `--duration`.
//!
//! ```text
//! cargo run --release --example loadgen -- --url http://127.0.0.1:8080/predictions/m \
//!     --body image.png --content-type image/png --rate 1000 --duration 10 [--warmup 2]
//! ```
//! Prints one JSON line: rate, sent, ok, errors, and latency percentiles in microseconds.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

struct Args {
    url: http::Uri,
    body: Bytes,
    content_type: String,
    rate: f64,
    duration: Duration,
    warmup: Duration,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut url, mut body, mut ct) = (None, None, "application/octet-stream".to_string());
    let (mut rate, mut duration, mut warmup) = (1000.0, 10.0, 1.0);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |v: String| v.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--body" => {
                let path = value()?;
                body = Some(std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?);
            }
            "--content-type" => ct = value()?,
            "--rate" => rate = num(value()?)?,
            "--duration" => duration = num(value()?)?,
            "--warmup" => warmup = num(value()?)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let url: http::Uri = url
        .ok_or("--url is required")?
        .parse()
        .map_err(|e| format!("--url: {e}"))?;
    // Load generators here talk to loopback only.
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!("--url must be a loopback address, not {host}"));
    }
    if !(rate > 0.0 && duration > 0.0 && warmup >= 0.0) {
        return Err("--rate and --duration must be positive, --warmup not negative".into());
    }
    Ok(Args {
        url,
        body: Bytes::from(body.unwrap_or_default()),
        content_type: ct,
        rate,
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
    })
}

/// What one run measured, in microseconds.
struct Measured {
    latencies: Vec<u64>,
    errors: u64,
    lags: Vec<u64>,
}

/// Sends at `rate` for `span`.
async fn run(client: &Client<HttpConnector, Full<Bytes>>, a: &Args, span: Duration) -> Measured {
    let total = (a.rate * span.as_secs_f64()).round() as u64;
    let results = Arc::new(Mutex::new((Vec::with_capacity(total as usize), 0u64)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut lags = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / a.rate);
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        lags.push(sent.saturating_duration_since(due).as_micros() as u64);
        let req = http::Request::post(a.url.clone())
            .header(http::header::CONTENT_TYPE, &a.content_type)
            .body(Full::new(a.body.clone()));
        let (client, results) = (client.clone(), results.clone());
        tasks.push(tokio::spawn(async move {
            let ok = match req {
                Ok(req) => match client.request(req).await {
                    Ok(resp) => {
                        let success = resp.status().is_success();
                        success && resp.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                },
                Err(_) => false,
            };
            let mut r = results.lock().await;
            if ok {
                r.0.push(sent.elapsed().as_micros() as u64);
            } else {
                r.1 += 1;
            }
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let mut r = results.lock().await;
    Measured {
        latencies: std::mem::take(&mut r.0),
        errors: r.1,
        lags,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    if !a.warmup.is_zero() {
        run(&client, &a, a.warmup).await;
    }
    let Measured {
        latencies: mut lat,
        errors,
        mut lags,
    } = run(&client, &a, a.duration).await;
    lat.sort_unstable();
    lags.sort_unstable();
    let p = |q| percentile(&lat, q);
    println!(
        "{}",
        serde_json::json!({
            "rate": a.rate, "sent": lat.len() as u64 + errors, "ok": lat.len(), "errors": errors,
            "p50_us": p(50.0), "p90_us": p(90.0), "p99_us": p(99.0), "p999_us": p(99.9),
            "max_us": lat.last().copied().unwrap_or(0), "lag_p99_us": percentile(&lags, 99.0),
        })
    );
}
