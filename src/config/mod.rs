//! One typed configuration: a TOML file (or the embedded default) merged with `DIFFGUARD_*`
//! environment overrides, then validated so that every error names the offending key.
//!
//! Env overrides use `__` between levels: `DIFFGUARD_SERVER__LISTEN=0.0.0.0:8080`,
//! `DIFFGUARD_CACHE__REDIS__URL=redis://cache:6379`. Routes are a list and only come from TOML.

mod validate;

use std::collections::BTreeMap;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

/// The embedded default: in-process cache, one TorchServe-style route, the bundled models.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an env override could not be parsed into the typed struct.
    #[error("config: {0}")]
    Parse(String),
    /// A value parsed but is not usable.
    #[error("config key `{key}`: {msg}")]
    Invalid {
        /// Dotted path of the bad key, e.g. `routes[1].upstream`.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners and request limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// The detector and its scoring queue.
    #[serde(default)]
    pub detector: DetectorConfig,
    /// Verdict cache tiers.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// How long verdict ids stay answerable.
    #[serde(default)]
    pub verdicts: VerdictsConfig,
    /// Optional POST of every OOD verdict report to an endpoint.
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// Path prefix → upstream routes; the longest matching prefix wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// Listeners and request limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    pub listen: String,
    /// Address of the ops listener (`/healthz`, `/readyz`, `/metrics`, `/openapi.json`).
    pub ops_listen: String,
    /// Largest request (and buffered upstream response) body in bytes; larger → 413.
    pub max_body_bytes: usize,
    /// Largest decoded image (width × height); larger → 413 before any pixel is decoded.
    pub max_pixels: u64,
    /// How long in-flight requests may take to drain at shutdown.
    pub shutdown_grace_ms: u64,
    /// Threads serving the proxy listener, each a single-threaded runtime that keeps its
    /// connections, their upstream connections and their guard work on one core; 0 = one per
    /// CPU.
    pub io_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            ops_listen: "127.0.0.1:9090".into(),
            max_body_bytes: 8 * 1024 * 1024,
            max_pixels: 4096 * 4096,
            shutdown_grace_ms: 10_000,
            io_threads: 0,
        }
    }
}

/// The detector and its scoring queue.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Which detector `build_detector` makes: `diffguard` (the engine on a model bundle) or
    /// `logits` (model-free confidence scores of the upstream's own logits).
    pub kind: String,
    /// Dedicated OS threads running the detector.
    pub threads: usize,
    /// Largest micro-batch handed to one `Detector::score` call.
    pub batch_size: usize,
    /// Jobs that may wait; when full a new job is `unverified` at once.
    pub queue_capacity: usize,
    /// Size of the detector's label space (label ids are `0..num_classes`).
    pub num_classes: u32,
    /// Detector-specific settings (recipe, weights, thresholds file), read by the detector.
    pub settings: BTreeMap<String, serde_json::Value>,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            kind: "diffguard".into(),
            threads: 1,
            batch_size: 8,
            queue_capacity: 256,
            num_classes: 10,
            settings: BTreeMap::new(),
        }
    }
}

/// Verdict cache tiers: always in memory, optionally Redis behind it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Entries kept in process.
    pub memory_capacity: u64,
    /// Time to live of an in-process entry, seconds.
    pub memory_ttl_secs: u64,
    /// Optional Redis (or Redis Cluster) second tier.
    pub redis: Option<RedisConfig>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            memory_capacity: 100_000,
            memory_ttl_secs: 3600,
            redis: None,
        }
    }
}

/// The Redis second tier.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` (TLS) URL; for a cluster, any node (see `cluster_nodes`).
    pub url: String,
    /// Extra cluster seed nodes; non-empty (or `cluster = true`) means Redis Cluster.
    #[serde(default)]
    pub cluster_nodes: Vec<String>,
    /// Treat `url` as a cluster seed node.
    #[serde(default)]
    pub cluster: bool,
    /// Prefix of every key the guard writes.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Time to live of a verdict in Redis, seconds.
    #[serde(default = "default_redis_ttl")]
    pub ttl_secs: u64,
    /// Per-command deadline; past it the lookup counts as a miss.
    #[serde(default = "default_redis_timeout")]
    pub response_timeout_ms: u64,
    /// Deadline of one connection attempt.
    #[serde(default = "default_redis_connect_timeout")]
    pub connect_timeout_ms: u64,
}

fn default_redis_prefix() -> String {
    "diffguard:v1:".into()
}
fn default_redis_ttl() -> u64 {
    7 * 24 * 3600
}
fn default_redis_timeout() -> u64 {
    100
}
fn default_redis_connect_timeout() -> u64 {
    300
}

impl std::fmt::Debug for RedisConfig {
    // The URL may carry a password; Debug output ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("ttl_secs", &self.ttl_secs)
            .field("response_timeout_ms", &self.response_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..scheme_end], user, &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

/// Logs and traces. OTLP export also honours the standard `OTEL_*` variables.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json` log lines.
    pub log_format: String,
    /// Default log filter when `RUST_LOG` is unset.
    pub log_filter: String,
    /// OTLP endpoint; unset → `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// none of them → no export.
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`; unset → `OTEL_EXPORTER_OTLP_PROTOCOL`, else `grpc`.
    pub otlp_protocol: Option<String>,
    /// Service name on exported spans; `OTEL_SERVICE_NAME` wins.
    pub service_name: String,
    /// Show the enclosing spans' fields (route, verdict id, …) on every log line. Off by default:
    /// formatting every span field of every request for the log costs more CPU than the rest of
    /// a cache hit's bookkeeping, and exported traces carry those fields anyway.
    pub log_spans: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            log_filter: "info".into(),
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: "diffguard".into(),
            log_spans: false,
        }
    }
}

/// Late-verdict bookkeeping.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerdictsConfig {
    /// Seconds a verdict id stays answerable.
    pub retention_secs: u64,
    /// Verdict ids kept; beyond it the oldest go first. A finished verdict costs ≈1 KB (its JSON
    /// report plus the cache's bookkeeping), so the default bounds them to ≈20 MB.
    pub capacity: u64,
}

impl Default for VerdictsConfig {
    fn default() -> Self {
        Self {
            retention_secs: 600,
            capacity: 20_000,
        }
    }
}

/// The optional webhook on OOD verdicts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// `http://` or `https://` endpoint that receives each OOD verdict report; unset → off.
    pub url: Option<String>,
    /// Deadline per attempt.
    pub timeout_ms: u64,
    /// Further attempts after a connection error, a timeout, 429 or 5xx (doubling back-off from
    /// 200 ms); other 4xx answers are final.
    pub retries: u32,
    /// Reports waiting for delivery; beyond it new ones are dropped and counted.
    pub queue_capacity: usize,
    /// Shared secret (at least 16 characters). When set, every delivery carries
    /// `diffguard-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, so the
    /// receiver can check who sent it and how fresh it is. Best given as
    /// `DIFFGUARD_WEBHOOK__SECRET` rather than in a file.
    pub secret: Option<Secret>,
    /// A file holding the secret instead (a Docker or Kubernetes secret mount; one trailing
    /// newline is ignored). Read when the guard starts; a restart picks up a rotated secret.
    /// Exclusive with `secret`.
    pub secret_file: Option<std::path::PathBuf>,
}

/// Shortest webhook secret accepted: 16 characters of a random token carry ≥ 64 bits.
const MIN_SECRET_CHARS: usize = 16;

/// Whether a webhook secret is long enough, however it was given (inline or from a file).
pub fn check_webhook_secret(secret: &str) -> Result<(), String> {
    if secret.chars().count() < MIN_SECRET_CHARS {
        return Err(format!("must be at least {MIN_SECRET_CHARS} characters"));
    }
    Ok(())
}

/// A configured secret: usable through [`Secret::expose`], printed as `***` everywhere else
/// (`Debug`, and `Serialize` for `diffguard config` output).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the code that signs with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: None,
            timeout_ms: 2_000,
            retries: 2,
            queue_capacity: 1_024,
            secret: None,
            secret_file: None,
        }
    }
}

/// One route: requests whose path starts with `prefix` go to `upstream`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in metrics, spans and verdicts.
    pub name: String,
    /// Path prefix, starting with `/`.
    pub prefix: String,
    /// Upstream base URL (`http://host:port[/base]`).
    pub upstream: String,
    /// Remove `prefix` before appending the path to the upstream base.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Where the image is in the request.
    pub request: RequestAdapterConfig,
    /// Where the predicted label is in the response.
    pub response: ResponseAdapterConfig,
    /// What to do with the verdict.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Class names in the detector's label order (index = label id).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Upstream class id → detector label id, for classifiers with another numbering.
    #[serde(default)]
    pub label_ids: BTreeMap<String, u32>,
    /// Add a `"diffguard"` object to JSON response bodies.
    #[serde(default)]
    pub inject_body: bool,
    /// TCP connect deadline to the upstream.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Deadline for the upstream's response headers; past it → 504.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_ms: u64,
}

fn default_connect_timeout() -> u64 {
    1_000
}
fn default_upstream_timeout() -> u64 {
    30_000
}

/// Where the image is in the request.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RequestAdapterConfig {
    /// The whole body is the image (`Content-Type: image/*` or octet-stream).
    Raw,
    /// A `multipart/form-data` field.
    Multipart {
        /// Form field name.
        field: String,
    },
    /// A base64 string inside a JSON body, found by JSON pointer (RFC 6901).
    JsonBase64 {
        /// e.g. `/image` or `/data/0/b64`.
        pointer: String,
    },
    /// KServe v1: `{"instances": [{"b64": "..."}, ...]}` (or bare base64 strings); one verdict each.
    KserveV1,
    /// Open Inference Protocol v2: a `BYTES` input whose `data` holds base64 images.
    OipV2 {
        /// Input name; unset → the first BYTES input.
        #[serde(default)]
        input: Option<String>,
    },
}

/// Where the predicted label is in the response.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseAdapterConfig {
    /// A class index (integer) at a JSON pointer.
    PointerIndex {
        /// JSON pointer.
        pointer: String,
        /// Optional pointer to a logits/scores array kept for diagnostics.
        #[serde(default)]
        logits: Option<String>,
    },
    /// A class name (string) at a JSON pointer.
    PointerName {
        /// JSON pointer.
        pointer: String,
        /// Optional pointer to a logits/scores array kept for diagnostics.
        #[serde(default)]
        logits: Option<String>,
    },
    /// The argmax of a scores/logits array at a JSON pointer (a 2-D array is a batch).
    Argmax {
        /// JSON pointer.
        pointer: String,
    },
    /// The key with the largest value in a `{class: prob}` object (TorchServe).
    TopKey {
        /// JSON pointer to the object; empty = the whole body.
        #[serde(default)]
        pointer: String,
    },
    /// KServe v1 `predictions`: per instance an index, a name, a scores array or `{class: prob}`.
    KserveV1,
    /// Open Inference Protocol v2 `outputs`: `[n]` labels or `[n, k]` scores.
    OipV2 {
        /// Output name; unset → the first output.
        #[serde(default)]
        output: Option<String>,
    },
}

/// What a route does with the verdict (DESIGN §3.6).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// `reject`, `flag`, `shadow` or `off`.
    pub mode: PolicyMode,
    /// How long `reject`/`flag` wait for a verdict not yet in the cache.
    pub wait_ms: u64,
    /// `reject` only: a verdict not ready in time passes (`open`) or gets 503 (`closed`).
    pub fail_mode: FailMode,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mode: PolicyMode::Flag,
            wait_ms: 2_000,
            fail_mode: FailMode::Open,
        }
    }
}

/// Route policy mode.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// Wait; OOD → 422.
    Reject,
    /// Wait up to the budget; annotate.
    Flag,
    /// Never wait, never change the response; record what would have happened.
    Shadow,
    /// Plain proxy, no scoring.
    Off,
}

/// Reject-mode behaviour when no verdict is available in time.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Pass the response as `unverified`.
    Open,
    /// Answer 503.
    Closed,
}

impl Config {
    /// Loads `path` (or the embedded default when `None`), applies `DIFFGUARD_*` env overrides,
    /// and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let base = match path {
            Some(p) => {
                if !p.exists() {
                    return Err(ConfigError::Parse(format!(
                        "file {} not found",
                        p.display()
                    )));
                }
                Figment::from(Toml::file(p))
            }
            None => Figment::from(Toml::string(DEFAULT_TOML)),
        };
        let figment = base.merge(
            Env::prefixed("DIFFGUARD_")
                // CLI flags share the prefix; config overrides always name a section (`A__B`).
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        Self::from_figment(figment)
    }

    /// Parses a TOML string without env overrides (tests, embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = figment.extract().map_err(|e| {
            let msgs: Vec<String> = e
                .into_iter()
                .map(|err| {
                    let key = err.path.join(".");
                    if key.is_empty() {
                        err.to_string()
                    } else {
                        format!("key `{key}`: {}", err.kind)
                    }
                })
                .collect();
            ConfigError::Parse(msgs.join("; "))
        })?;
        validate::validate(&cfg)?;
        Ok(cfg)
    }

    /// The configuration as TOML with secrets replaced by `***` (for the startup log).
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        if let Some(r) = c.cache.redis.as_mut() {
            r.url = redact_url(&r.url);
            r.cluster_nodes = r.cluster_nodes.iter().map(|u| redact_url(u)).collect();
        }
        toml_string(&c)
    }
}

fn toml_string(c: &Config) -> String {
    // figment re-exports no serializer; JSON is an honest, readable fallback for the log line.
    serde_json::to_string(c).unwrap_or_else(|e| format!("<unprintable config: {e}>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_but_keeps_host() {
        assert_eq!(
            redact_url("redis://:hunter2@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(redact_url("rediss://u:p@h:1"), "rediss://u:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::from_toml(DEFAULT_TOML).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert!(c.cache.redis.is_none());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlistn = 3\n").unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn io_threads_beyond_the_bound_are_refused_by_name() {
        let text = DEFAULT_TOML.replace("io_threads = 0", "io_threads = 100000");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("server.io_threads"), "{err}");
        let ok = DEFAULT_TOML.replace("io_threads = 0", "io_threads = 3");
        assert_eq!(Config::from_toml(&ok).unwrap().server.io_threads, 3);
    }

    #[test]
    fn redacted_log_has_no_password() {
        let text =
            format!("{DEFAULT_TOML}\n[cache.redis]\nurl = \"redis://:s3cret@127.0.0.1:6379\"\n");
        let c = Config::from_toml(&text).unwrap();
        assert!(!c.redacted_toml().contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
