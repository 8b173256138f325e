//! The Redis tier against real `redis-server` processes this test starts (and kills) on free
//! loopback ports. Skipped loudly when `redis-server` is not installed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct RedisProc {
    port: u16,
    child: Child,
}

impl RedisProc {
    fn start_on(port: u16) -> Option<Self> {
        Self::spawn(port, &[])
    }

    fn spawn(port: u16, extra: &[&str]) -> Option<Self> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let p = Self { port, child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if p.cmd(&["PING"]).as_deref() == Some("PONG") {
                return Some(p);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} did not answer");
    }

    fn start() -> Option<Self> {
        Self::start_on(free_port())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command through redis-cli's sibling: the redis crate, synchronously.
    fn cmd(&self, args: &[&str]) -> Option<String> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut c = client
            .get_connection_with_timeout(Duration::from_millis(200))
            .ok()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let v: redis::Value = cmd.query(&mut c).ok()?;
        Some(match v {
            redis::Value::SimpleString(s) => s,
            redis::Value::Okay => "OK".into(),
            redis::Value::Int(i) => i.to_string(),
            redis::Value::Array(a) => a.len().to_string(),
            other => format!("{other:?}"),
        })
    }

    fn keys(&self, pattern: &str) -> usize {
        self.cmd(&["KEYS", pattern])
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_or_skip() -> Option<RedisProc> {
    let r = RedisProc::start();
    if r.is_none() {
        eprintln!("SKIPPED: redis-server is not installed (scripts/ensure-redis.sh installs it)");
    }
    r
}

const ROUTE: &str = "name = \"r\"\nprefix = \"/predictions/\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"top_key\" }\npolicy = { mode = \"flag\", wait_ms = 3000 }\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]";

fn redis_section(url: &str) -> String {
    format!(
        "[cache.redis]\nurl = \"{url}\"\nkey_prefix = \"dgtest:\"\nttl_secs = 60\nresponse_timeout_ms = 150\nconnect_timeout_ms = 150"
    )
}

/// The cluster connection is made in the background; readiness says when it is up.
async fn wait_connected(g: &TestGuard) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.ops("/readyz").await.status != 200 {
        assert!(
            Instant::now() < deadline,
            "guard never connected to the cluster"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hit_survives_a_guard_restart() {
    let Some(redis) = redis_or_skip() else { return };
    let up = Upstream::example().await;
    let img = png(28, 28, 100);

    let det_a = TestDetector::new();
    let mut a = guard()
        .with(&redis_section(&redis.url()))
        .route(&up, ROUTE)
        .start(det_a.clone())
        .await;
    let r = a.post("/predictions/m", "image/png", img.clone()).await;
    assert_eq!(
        (r.h("diffguard-verdict"), r.h("diffguard-cache")),
        (Some("in-distribution"), Some("miss"))
    );
    wait_until("verdict written to redis", || redis.keys("dgtest:*") == 1).await;
    a.stop().await;

    let det_b = TestDetector::new();
    let b = guard()
        .with(&redis_section(&redis.url()))
        .route(&up, ROUTE)
        .start(det_b.clone())
        .await;
    let r = b.post("/predictions/m", "image/png", img).await;
    assert_eq!(
        r.h("diffguard-cache"),
        Some("hit"),
        "a fresh guard finds the verdict in Redis"
    );
    assert_eq!(r.h("diffguard-verdict"), Some("in-distribution"));
    assert_eq!(det_b.jobs(), 0, "no rescoring after restart");
    assert_eq!(b.ops("/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_degrades_then_reconnects() {
    let Some(redis) = redis_or_skip() else { return };
    let up = Upstream::example().await;
    let det = TestDetector::new();
    let g = guard()
        .with(&redis_section(&redis.url()))
        .route(&up, ROUTE)
        .start(det.clone())
        .await;
    assert_eq!(
        g.post("/predictions/m", "image/png", png(28, 28, 1))
            .await
            .status,
        200
    );
    wait_until("first verdict in redis", || redis.keys("dgtest:*") == 1).await;
    let errors_before = metric_sum(
        &g.ops("/metrics").await.text(),
        "diffguard_cache_errors_total",
        "tier=\"redis\"",
    );

    let port = redis.kill();
    for i in 0..5u8 {
        let t = Instant::now();
        let r = g
            .post("/predictions/m", "image/png", png(28, 28, 10 + i))
            .await;
        assert_eq!(r.status, 200, "Redis down never fails a request");
        assert_eq!(
            r.h("diffguard-verdict"),
            Some("in-distribution"),
            "still scored"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "bounded by the Redis timeouts ({:?})",
            t.elapsed()
        );
    }
    let ready = g.ops("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let errors_after = metric_sum(
        &g.ops("/metrics").await.text(),
        "diffguard_cache_errors_total",
        "tier=\"redis\"",
    );
    assert!(
        errors_after >= errors_before + 5.0,
        "each failed Redis lookup is counted ({errors_before} → {errors_after})"
    );

    let redis = RedisProc::start_on(port).expect("restart redis-server");
    // Keep sending new images until one lands in the restarted (empty) Redis.
    let mut n = 100u8;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys("dgtest:*") == 0 {
        assert!(
            Instant::now() < deadline,
            "the guard never reconnected to Redis"
        );
        assert_eq!(
            g.post("/predictions/m", "image/png", png(28, 28, n))
                .await
                .status,
            200
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(g.ops("/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_absent_at_start_tls_and_cluster_urls_degrade_to_memory() {
    let up = Upstream::example().await;
    let port = free_port();
    for (url, extra) in [
        (format!("redis://:secret@127.0.0.1:{port}/0"), ""),
        (format!("rediss://127.0.0.1:{port}"), ""),
        (format!("redis://127.0.0.1:{port}"), "cluster = true\n"),
    ] {
        let det = TestDetector::new();
        let section = format!("{}\n{extra}", redis_section(&url));
        let g = guard()
            .with(&section)
            .route(&up, ROUTE)
            .start(det.clone())
            .await;
        let img = png(28, 28, 99);
        let r = g.post("/predictions/m", "image/png", img.clone()).await;
        assert_eq!(
            (r.status, r.h("diffguard-verdict")),
            (200, Some("in-distribution")),
            "{url}"
        );
        // The memory tier still works without Redis.
        let r = g.post("/predictions/m", "image/png", img).await;
        assert_eq!(
            r.h("diffguard-cache"),
            Some("hit"),
            "{url} jobs={} {:?}",
            det.jobs(),
            r.text()
        );
        assert_eq!(det.jobs(), 1);
        assert_eq!(
            g.ops("/readyz").await.status,
            503,
            "{url}: readiness reports Redis down"
        );
    }
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 50_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_tier_shares_verdicts() {
    if RedisProc::start().is_none() {
        eprintln!("SKIPPED: redis-server is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("diffguard-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nodes: Vec<RedisProc> = (0..3)
        .map(|i| {
            let port = cluster_port();
            let conf = dir.join(format!("nodes-{i}-{port}.conf"));
            let d = dir.to_str().unwrap().to_string();
            RedisProc::spawn(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--dir",
                    &d,
                ],
            )
            .unwrap()
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !created.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: redis-cli --cluster create failed");
        return;
    }
    wait_until("cluster state ok", || {
        nodes.iter().all(|n| {
            redis::Client::open(n.url())
                .ok()
                .and_then(|c| {
                    c.get_connection_with_timeout(Duration::from_millis(200))
                        .ok()
                })
                .and_then(|mut c| {
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query::<String>(&mut c)
                        .ok()
                })
                .is_some_and(|info| info.contains("cluster_state:ok"))
        })
    })
    .await;
    let section = format!(
        "{}\ncluster = true\ncluster_nodes = [\"redis://{}\"]",
        redis_section(&nodes[0].url()),
        addrs[1]
    );
    let up = Upstream::example().await;
    let images: Vec<Vec<u8>> = (0..6u8).map(|i| png(28, 28, 40 + i)).collect();

    let mut a = guard()
        .with(&section)
        .route(&up, ROUTE)
        .start(TestDetector::new())
        .await;
    // Verdicts scored before the cluster connection is up stay in memory only (by design), so the
    // writes this test counts must wait for it.
    wait_connected(&a).await;
    for img in &images {
        assert_eq!(
            a.post("/predictions/m", "image/png", img.clone())
                .await
                .h("diffguard-cache"),
            Some("miss")
        );
    }
    wait_until("all verdicts in the cluster", || {
        nodes.iter().map(|n| n.keys("dgtest:*")).sum::<usize>() == images.len()
    })
    .await;
    a.stop().await;

    let det = TestDetector::new();
    let b = guard()
        .with(&section)
        .route(&up, ROUTE)
        .start(det.clone())
        .await;
    wait_connected(&b).await;
    for img in &images {
        assert_eq!(
            b.post("/predictions/m", "image/png", img.clone())
                .await
                .h("diffguard-cache"),
            Some("hit")
        );
    }
    assert_eq!(det.jobs(), 0);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
