//! Cross-field checks that serde cannot express; each error names its key.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{Config, ConfigError, RequestAdapterConfig, ResponseAdapterConfig, RouteConfig};

fn invalid(key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        msg: msg.into(),
    }
}

pub(super) fn validate(c: &Config) -> Result<(), ConfigError> {
    for (key, addr) in [
        ("server.listen", &c.server.listen),
        ("server.ops_listen", &c.server.ops_listen),
    ] {
        addr.parse::<SocketAddr>()
            .map_err(|e| invalid(key, format!("`{addr}` is not a socket address: {e}")))?;
    }
    positive("server.max_body_bytes", c.server.max_body_bytes as u64)?;
    positive("server.max_pixels", c.server.max_pixels)?;
    if c.server.io_threads > MAX_IO_THREADS {
        return Err(invalid(
            "server.io_threads",
            format!("at most {MAX_IO_THREADS} (0 = one per CPU)"),
        ));
    }
    positive("detector.threads", c.detector.threads as u64)?;
    positive("detector.batch_size", c.detector.batch_size as u64)?;
    positive("detector.queue_capacity", c.detector.queue_capacity as u64)?;
    positive("detector.num_classes", u64::from(c.detector.num_classes))?;
    positive("cache.memory_capacity", c.cache.memory_capacity)?;
    positive("cache.memory_ttl_secs", c.cache.memory_ttl_secs)?;
    if let Some(r) = &c.cache.redis {
        for (i, url) in std::iter::once(&r.url).chain(&r.cluster_nodes).enumerate() {
            let key = if i == 0 {
                "cache.redis.url".to_string()
            } else {
                format!("cache.redis.cluster_nodes[{}]", i - 1)
            };
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(key, "must start with redis:// or rediss://"));
            }
        }
        positive("cache.redis.ttl_secs", r.ttl_secs)?;
        positive("cache.redis.response_timeout_ms", r.response_timeout_ms)?;
    }
    if !matches!(c.telemetry.log_format.as_str(), "text" | "json") {
        return Err(invalid("telemetry.log_format", "must be `text` or `json`"));
    }
    if let Some(p) = &c.telemetry.otlp_protocol
        && !matches!(p.as_str(), "grpc" | "http/protobuf")
    {
        return Err(invalid(
            "telemetry.otlp_protocol",
            "must be `grpc` or `http/protobuf`",
        ));
    }
    if let Some(url) = &c.webhook.url {
        validate_webhook(url).map_err(|m| invalid("webhook.url", m))?;
    }
    positive("webhook.timeout_ms", c.webhook.timeout_ms)?;
    positive("webhook.queue_capacity", c.webhook.queue_capacity as u64)?;
    if let Some(secret) = &c.webhook.secret {
        super::check_webhook_secret(secret.expose()).map_err(|m| invalid("webhook.secret", m))?;
    }
    if c.webhook.secret.is_some() && c.webhook.secret_file.is_some() {
        return Err(invalid(
            "webhook.secret_file",
            "set either webhook.secret or webhook.secret_file, not both",
        ));
    }
    if c.routes.is_empty() {
        return Err(invalid("routes", "at least one route is needed"));
    }
    let mut names = HashSet::new();
    let mut prefixes = HashSet::new();
    for (i, r) in c.routes.iter().enumerate() {
        let k = |f: &str| format!("routes[{i}].{f}");
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            return Err(invalid(
                k("name"),
                format!("`{}` is empty or used twice", r.name),
            ));
        }
        if !r.prefix.starts_with('/') || !prefixes.insert(r.prefix.as_str()) {
            return Err(invalid(
                k("prefix"),
                format!("`{}` must start with `/` and be unique", r.prefix),
            ));
        }
        if r.prefix.starts_with("/diffguard/") {
            return Err(invalid(
                k("prefix"),
                "`/diffguard/` is reserved for the verdict API",
            ));
        }
        validate_upstream(&r.upstream).map_err(|m| invalid(k("upstream"), m))?;
        positive(&k("timeout_ms"), r.timeout_ms)?;
        positive(&k("connect_timeout_ms"), r.connect_timeout_ms)?;
        validate_adapters(r, &k)?;
        validate_labels(r, c.detector.num_classes, &k)?;
    }
    Ok(())
}

/// Each I/O thread is a runtime with its own upstream pools; beyond this a typo is likelier than a
/// machine that needs it.
const MAX_IO_THREADS: usize = 1024;

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        Err(invalid(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

/// Parses an absolute URL with one of `schemes` and a host.
fn http_url(url: &str, schemes: &[&str], why: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !uri.scheme_str().is_some_and(|s| schemes.contains(&s)) {
        return Err(format!("`{url}`: {why}"));
    }
    if uri.authority().is_none() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(uri)
}

fn validate_upstream(url: &str) -> Result<(), String> {
    let uri = http_url(
        url,
        &["http"],
        "only http:// upstreams are supported (terminate TLS in front)",
    )?;
    if uri.query().is_some() {
        return Err(format!("`{url}` must not carry a query"));
    }
    Ok(())
}

fn validate_webhook(url: &str) -> Result<(), String> {
    http_url(
        url,
        &["http", "https"],
        "must start with http:// or https://",
    )
    .map(|_| ())
}

fn validate_pointer(key: String, p: &str) -> Result<(), ConfigError> {
    if !p.is_empty() && !p.starts_with('/') {
        return Err(invalid(
            key,
            format!("`{p}` is not a JSON pointer (must start with `/`)"),
        ));
    }
    Ok(())
}

fn validate_adapters(r: &RouteConfig, k: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    match &r.request {
        RequestAdapterConfig::Multipart { field } if field.is_empty() => {
            return Err(invalid(k("request.field"), "must not be empty"));
        }
        RequestAdapterConfig::JsonBase64 { pointer } => {
            validate_pointer(k("request.pointer"), pointer)?;
            if pointer.is_empty() {
                return Err(invalid(k("request.pointer"), "must not be empty"));
            }
        }
        _ => {}
    }
    match &r.response {
        ResponseAdapterConfig::PointerIndex { pointer, logits }
        | ResponseAdapterConfig::PointerName { pointer, logits } => {
            validate_pointer(k("response.pointer"), pointer)?;
            if let Some(l) = logits {
                validate_pointer(k("response.logits"), l)?;
            }
        }
        ResponseAdapterConfig::Argmax { pointer } | ResponseAdapterConfig::TopKey { pointer } => {
            validate_pointer(k("response.pointer"), pointer)?;
        }
        _ => {}
    }
    Ok(())
}

fn validate_labels(
    r: &RouteConfig,
    num_classes: u32,
    k: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if r.labels.len() > num_classes as usize {
        return Err(invalid(
            k("labels"),
            format!(
                "{} names for a detector with detector.num_classes = {num_classes}",
                r.labels.len()
            ),
        ));
    }
    let needs_names = matches!(
        r.response,
        ResponseAdapterConfig::PointerName { .. } | ResponseAdapterConfig::TopKey { .. }
    );
    if needs_names && r.labels.is_empty() {
        return Err(invalid(
            k("labels"),
            "this response adapter yields class names; list them in detector label order",
        ));
    }
    for (from, to) in &r.label_ids {
        if *to >= num_classes {
            return Err(invalid(
                format!("{}.{from}", k("label_ids")),
                format!("{to} is outside 0..{num_classes}"),
            ));
        }
    }
    Ok(())
}
