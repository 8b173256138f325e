//! Every shipped config parses and validates; bad configs name the key; the CLI applies env
//! overrides, redacts secrets, and the demo runs end to end.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use diffguard::config::Config;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_shipped_config_is_valid() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg =
                Config::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!cfg.routes.is_empty());
            n += 1;
        }
    }
    assert!(
        n >= 6,
        "default, torchserve, kserve-v1, oip-v2, custom-json, redis: found {n}"
    );
}

#[test]
fn bad_values_name_their_key() {
    let route = |extra: &str| {
        format!(
            "[[routes]]\nname = \"a\"\nprefix = \"/p\"\nupstream = \"http://u:1\"\nrequest = {{ kind = \"raw\" }}\nresponse = {{ kind = \"argmax\", pointer = \"/s\" }}\n{extra}"
        )
    };
    let cases = [
        (
            route("").replace("http://u:1", "https://u:1"),
            "routes[0].upstream",
        ),
        (route("").replace("\"/p\"", "\"p\""), "routes[0].prefix"),
        (
            route("").replace("\"/s\"", "\"s\""),
            "routes[0].response.pointer",
        ),
        (route("label_ids = { \"7\" = 12 }"), "routes[0].label_ids.7"),
        (route("colour = \"red\""), "colour"),
        (route("policy = { mode = \"block\" }"), "block"),
        (
            format!("[server]\nlisten = \"nowhere\"\n{}", route("")),
            "server.listen",
        ),
        (
            format!("[detector]\nthreads = 0\n{}", route("")),
            "detector.threads",
        ),
        (
            format!("[cache.redis]\nurl = \"http://r:6379\"\n{}", route("")),
            "cache.redis.url",
        ),
        (
            route("").replace(
                "response = { kind = \"argmax\", pointer = \"/s\" }",
                "response = { kind = \"top_key\" }",
            ),
            "routes[0].labels",
        ),
        (
            format!("[webhook]\nurl = \"ftp://hooks\"\n{}", route("")),
            "webhook.url",
        ),
        (
            format!(
                "[webhook]\nurl = \"http://h\"\ntimeout_ms = 0\n{}",
                route("")
            ),
            "webhook.timeout_ms",
        ),
        (
            format!(
                "[webhook]\nurl = \"http://h\"\nsecret = \"short\"\n{}",
                route("")
            ),
            "webhook.secret",
        ),
        (
            format!(
                "[webhook]\nurl = \"http://h\"\nsecret = \"0123456789abcdef\"\nsecret_file = \"/run/secrets/hook\"\n{}",
                route("")
            ),
            "webhook.secret_file",
        ),
        ("[server]\n".to_string(), "routes"),
        (route("").replace("\"/p\"", "\"/diffguard/x\""), "reserved"),
    ];
    for (text, key) in cases {
        let err = Config::from_toml(&text).expect_err(&text).to_string();
        assert!(
            err.contains(key),
            "error for `{key}` does not name it: {err}"
        );
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffguard"))
}

#[test]
fn cli_env_overrides_and_redaction() {
    let out = bin()
        .args(["serve", "--check", "--config"])
        .arg(repo().join("config/redis.toml"))
        .env(
            "DIFFGUARD_CACHE__REDIS__URL",
            "redis://:hunter2@cache.internal:6380/1",
        )
        .env("DIFFGUARD_SERVER__MAX_PIXELS", "1234")
        .env("DIFFGUARD_WEBHOOK__URL", "https://hooks.example/ood")
        .env("DIFFGUARD_WEBHOOK__SECRET", "whsec-correct-horse-battery")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("redis://:***@cache.internal:6380/1"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"));
    assert!(stdout.contains("\"secret\":\"***\""), "{stdout}");
    assert!(!stdout.contains("correct-horse"), "{stdout}");
    assert!(stdout.contains("\"max_pixels\":1234"), "{stdout}");

    let out = bin()
        .args(["serve", "--check"])
        .env("DIFFGUARD_DETECTOR__BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("detector.batch_size"));

    let out = bin()
        .args(["serve", "--check", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));

    let help = bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("DIFFGUARD_CONFIG") && help.contains("DIFFGUARD_LISTEN"),
        "{help}"
    );
}

#[test]
fn cli_demo_prints_a_verdict_table() {
    let out = bin().args(["demo", "--wait-ms", "2000"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "fashion-0000-boot.png",
        "mnist-digit7.png",
        "verdict",
        "latency",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }
    // The default bundle's detector scores every image: no row is left unverified.
    assert!(
        stdout
            .lines()
            .filter(|l| l.starts_with("fashion-") || l.starts_with("mnist-"))
            .all(|l| l.contains("in-distribution") || l.contains(" ood ")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_rows_carry_the_classifier_label_and_cache_hit() {
    let rows = diffguard::demo::run(
        TestDetector::new(),
        diffguard::upstream::default_classifier(),
        5_000,
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), diffguard::demo::IMAGES.len() + 1);
    for (row, (_, _, bytes)) in rows.iter().zip(diffguard::demo::IMAGES.iter()) {
        assert_eq!(row.status, 200);
        assert_eq!(
            row.predicted,
            diffguard::upstream::FASHION_CLASSES[classifier_label(bytes)]
        );
        assert!(
            row.verdict == "in-distribution" || row.verdict == "ood",
            "{row:?}"
        );
        assert_eq!(row.cache, "miss");
    }
    assert_eq!(rows.last().unwrap().cache, "hit");
    let table = diffguard::demo::table(&rows);
    assert_eq!(table.lines().count(), rows.len() + 1);
}
