//! Request adapters: find the encoded image(s) in a request body. A batch yields one image per
//! instance, in order.

use base64::Engine as _;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use crate::config::RequestAdapterConfig;

/// The request does not contain an image where the route says it is.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestAdapterError {
    /// The body is not JSON.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// Expected content is absent.
    #[error("missing {0}")]
    Missing(String),
    /// A string that should be base64 is not.
    #[error("{0} is not valid base64")]
    BadBase64(String),
    /// The body is not multipart/form-data, or is malformed.
    #[error("multipart: {0}")]
    Multipart(String),
}

/// Extracts the encoded images the route's adapter points at.
pub fn extract_images(
    cfg: &RequestAdapterConfig,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<Bytes>, RequestAdapterError> {
    match cfg {
        RequestAdapterConfig::Raw => {
            if body.is_empty() {
                return Err(RequestAdapterError::Missing("image body".into()));
            }
            Ok(vec![body.clone()])
        }
        RequestAdapterConfig::Multipart { field } => {
            let ct = headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            super::multipart::field(ct, body, field).map(|b| vec![b])
        }
        RequestAdapterConfig::JsonBase64 { pointer } => {
            let v = parse_json(body)?;
            let s = v.pointer(pointer).and_then(Value::as_str).ok_or_else(|| {
                RequestAdapterError::Missing(format!("base64 string at {pointer}"))
            })?;
            Ok(vec![decode_b64(s, pointer)?])
        }
        RequestAdapterConfig::KserveV1 => kserve_v1(&parse_json(body)?),
        RequestAdapterConfig::OipV2 { input } => oip_v2(&parse_json(body)?, input.as_deref()),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, RequestAdapterError> {
    serde_json::from_slice(body).map_err(|e| RequestAdapterError::InvalidJson(e.to_string()))
}

/// Standard base64; a `data:...;base64,` prefix is allowed.
pub fn decode_b64(s: &str, what: &str) -> Result<Bytes, RequestAdapterError> {
    let s = match s.find(";base64,") {
        Some(i) if s.starts_with("data:") => &s[i + 8..],
        _ => s,
    };
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map(Bytes::from)
        .map_err(|_| RequestAdapterError::BadBase64(what.to_string()))
}

fn kserve_v1(v: &Value) -> Result<Vec<Bytes>, RequestAdapterError> {
    let instances = v
        .get("instances")
        .and_then(Value::as_array)
        .ok_or_else(|| RequestAdapterError::Missing("`instances` array".into()))?;
    if instances.is_empty() {
        return Err(RequestAdapterError::Missing(
            "instances (empty array)".into(),
        ));
    }
    instances
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            let what = format!("instances[{i}].b64");
            let s = inst
                .get("b64")
                .and_then(Value::as_str)
                .or_else(|| inst.as_str())
                .ok_or_else(|| RequestAdapterError::Missing(what.clone()))?;
            decode_b64(s, &what)
        })
        .collect()
}

fn oip_v2(v: &Value, name: Option<&str>) -> Result<Vec<Bytes>, RequestAdapterError> {
    let inputs = v
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| RequestAdapterError::Missing("`inputs` array".into()))?;
    let input = inputs
        .iter()
        .find(|i| match name {
            Some(n) => i.get("name").and_then(Value::as_str) == Some(n),
            None => i.get("datatype").and_then(Value::as_str) == Some("BYTES"),
        })
        .ok_or_else(|| {
            RequestAdapterError::Missing(format!("BYTES input {}", name.unwrap_or("(any)")))
        })?;
    let data = input
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| RequestAdapterError::Missing("input `data` array".into()))?;
    if data.is_empty() {
        return Err(RequestAdapterError::Missing(
            "input data (empty array)".into(),
        ));
    }
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            let what = format!("inputs.data[{i}]");
            let s = d
                .as_str()
                .ok_or_else(|| RequestAdapterError::Missing(what.clone()))?;
            decode_b64(s, &what)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn kserve_batch_in_order() {
        let body = Bytes::from(
            serde_json::json!({"instances": [{"b64": b64(b"a")}, b64(b"b")]}).to_string(),
        );
        let imgs =
            extract_images(&RequestAdapterConfig::KserveV1, &HeaderMap::new(), &body).unwrap();
        assert_eq!(imgs, vec![Bytes::from("a"), Bytes::from("b")]);
    }

    #[test]
    fn oip_picks_named_input() {
        let body = serde_json::json!({"inputs": [
            {"name": "other", "datatype": "BYTES", "shape": [1], "data": [b64(b"x")]},
            {"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(b"p"), b64(b"q")]}]});
        let imgs = extract_images(
            &RequestAdapterConfig::OipV2 {
                input: Some("image".into()),
            },
            &HeaderMap::new(),
            &Bytes::from(body.to_string()),
        )
        .unwrap();
        assert_eq!(imgs, vec![Bytes::from("p"), Bytes::from("q")]);
    }

    #[test]
    fn json_pointer_errors_are_specific() {
        let cfg = RequestAdapterConfig::JsonBase64 {
            pointer: "/image".into(),
        };
        let h = HeaderMap::new();
        assert!(matches!(
            extract_images(&cfg, &h, &Bytes::from("{nope")),
            Err(RequestAdapterError::InvalidJson(_))
        ));
        assert!(matches!(
            extract_images(&cfg, &h, &Bytes::from("{}")),
            Err(RequestAdapterError::Missing(_))
        ));
        assert!(matches!(
            extract_images(&cfg, &h, &Bytes::from(r#"{"image":"@@@"}"#)),
            Err(RequestAdapterError::BadBase64(_))
        ));
        let ok = format!(r#"{{"image":"data:image/png;base64,{}"}}"#, b64(b"png"));
        assert_eq!(
            extract_images(&cfg, &h, &Bytes::from(ok)).unwrap(),
            vec![Bytes::from("png")]
        );
    }
}
