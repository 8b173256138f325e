//! Response adapters: read the predicted class (and logits when present) for each instance from
//! the upstream's JSON answer, then map it into the detector's label space.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::ResponseAdapterConfig;

/// A class as the upstream named it.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamLabel {
    /// A class index.
    Index(i64),
    /// A class name.
    Name(String),
}

/// One instance's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Predicted class.
    pub label: UpstreamLabel,
    /// Scores/logits when the answer has them.
    pub logits: Option<Vec<f32>>,
}

/// The answer does not hold a prediction where the route says.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ResponseAdapterError {
    /// Not JSON.
    #[error("upstream answer is not JSON")]
    NotJson,
    /// Nothing usable at the expected place.
    #[error("no prediction at {0}")]
    Missing(String),
}

fn missing(what: impl Into<String>) -> ResponseAdapterError {
    ResponseAdapterError::Missing(what.into())
}

/// Reads the predictions from an upstream body.
pub fn extract_predictions(
    cfg: &ResponseAdapterConfig,
    body: &[u8],
) -> Result<Vec<Prediction>, ResponseAdapterError> {
    match super::scan::predictions(cfg, body) {
        Some(p) => Ok(p),
        None => parsed_predictions(cfg, body),
    }
}

/// The general path: the whole answer parsed into a `Value`, then read.
pub(super) fn parsed_predictions(
    cfg: &ResponseAdapterConfig,
    body: &[u8],
) -> Result<Vec<Prediction>, ResponseAdapterError> {
    let v: Value = serde_json::from_slice(body).map_err(|_| ResponseAdapterError::NotJson)?;
    let at = |p: &str| pointer(&v, p);
    let logits_at = |p: &Option<String>| {
        p.as_deref()
            .and_then(at)
            .and_then(Value::as_array)
            .and_then(|a| floats(a))
    };
    match cfg {
        ResponseAdapterConfig::PointerIndex { pointer, logits } => {
            let i = at(pointer)
                .and_then(Value::as_i64)
                .ok_or_else(|| missing(format!("{pointer} (integer)")))?;
            Ok(vec![Prediction {
                label: UpstreamLabel::Index(i),
                logits: logits_at(logits),
            }])
        }
        ResponseAdapterConfig::PointerName { pointer, logits } => {
            let s = at(pointer)
                .and_then(Value::as_str)
                .ok_or_else(|| missing(format!("{pointer} (string)")))?;
            Ok(vec![Prediction {
                label: UpstreamLabel::Name(s.into()),
                logits: logits_at(logits),
            }])
        }
        ResponseAdapterConfig::Argmax { pointer } => {
            let a = at(pointer)
                .and_then(Value::as_array)
                .ok_or_else(|| missing(format!("{pointer} (array)")))?;
            if a.first().is_some_and(Value::is_array) {
                a.iter()
                    .map(|row| {
                        row.as_array()
                            .and_then(|r| scores_prediction(r))
                            .ok_or_else(|| missing(format!("{pointer} (number rows)")))
                    })
                    .collect()
            } else {
                Ok(vec![
                    scores_prediction(a).ok_or_else(|| missing(format!("{pointer} (numbers)")))?,
                ])
            }
        }
        ResponseAdapterConfig::TopKey { pointer } => {
            let o = at(pointer).ok_or_else(|| missing(format!("{pointer} (object)")))?;
            // TorchServe answers a batch of one as the object itself, larger batches as a list.
            match o {
                Value::Array(items) => items
                    .iter()
                    .map(|i| top_key(i).ok_or_else(|| missing("{class: prob} objects")))
                    .collect(),
                _ => Ok(vec![top_key(o).ok_or_else(|| {
                    missing(format!("{pointer} ({{class: prob}})"))
                })?]),
            }
        }
        ResponseAdapterConfig::KserveV1 => {
            let preds = v
                .get("predictions")
                .and_then(Value::as_array)
                .ok_or_else(|| missing("`predictions` array"))?;
            preds
                .iter()
                .enumerate()
                .map(|(i, p)| any_prediction(p).ok_or_else(|| missing(format!("predictions[{i}]"))))
                .collect()
        }
        ResponseAdapterConfig::OipV2 { output } => oip_v2(&v, output.as_deref()),
    }
}

/// `Value::pointer` (RFC 6901), without its allocation per token: the route's pointer is walked
/// on every answer. An empty pointer is the whole document.
fn pointer<'a>(v: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(v);
    }
    if pointer.contains('~') {
        // Escaped tokens (`~0`, `~1`) are rare enough to take the general path.
        return v.pointer(pointer);
    }
    pointer
        .strip_prefix('/')?
        .split('/')
        .try_fold(v, |v, token| match v {
            Value::Object(m) => m.get(token),
            Value::Array(a) => array_index(token).and_then(|i| a.get(i)),
            _ => None,
        })
}

/// An array index token: digits, no sign, no leading zero (RFC 6901 §4).
pub(super) fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

fn floats(v: &[Value]) -> Option<Vec<f32>> {
    v.iter().map(|x| x.as_f64().map(|f| f as f32)).collect()
}

fn argmax(xs: &[f32]) -> Option<usize> {
    xs.iter()
        .enumerate()
        .filter(|(_, x)| !x.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

fn scores_prediction(v: &[Value]) -> Option<Prediction> {
    argmax_prediction(floats(v)?)
}

/// The index of the highest score, keeping the scores as logits (both adapter paths).
pub(super) fn argmax_prediction(xs: Vec<f32>) -> Option<Prediction> {
    let i = argmax(&xs)?;
    Some(Prediction {
        label: UpstreamLabel::Index(i as i64),
        logits: Some(xs),
    })
}

fn top_key(v: &Value) -> Option<Prediction> {
    let o = v.as_object()?;
    top_class(
        o.iter()
            .filter_map(|(k, p)| p.as_f64().map(|p| (k.as_str(), p))),
    )
}

/// The class with the highest probability, from `(class, probability)` pairs in class-name order
/// (both adapter paths): of equal maxima the last, i.e. the greatest name, wins, as `max_by` keeps
/// the last.
pub(super) fn top_class<'a>(entries: impl Iterator<Item = (&'a str, f64)>) -> Option<Prediction> {
    let (k, _) = entries.max_by(|a, b| a.1.total_cmp(&b.1))?;
    Some(Prediction {
        label: UpstreamLabel::Name(k.to_owned()),
        logits: None,
    })
}

/// KServe v1 predictions come in every shape: index, name, scores array or `{class: prob}`.
fn any_prediction(v: &Value) -> Option<Prediction> {
    match v {
        Value::Number(n) => n.as_i64().map(|i| Prediction {
            label: UpstreamLabel::Index(i),
            logits: None,
        }),
        Value::String(s) => Some(Prediction {
            label: UpstreamLabel::Name(s.clone()),
            logits: None,
        }),
        Value::Array(a) => scores_prediction(a),
        Value::Object(_) => top_key(v),
        _ => None,
    }
}

fn oip_v2(v: &Value, name: Option<&str>) -> Result<Vec<Prediction>, ResponseAdapterError> {
    let outputs = v
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or_else(|| missing("`outputs` array"))?;
    let out = match name {
        Some(n) => outputs
            .iter()
            .find(|o| o.get("name").and_then(Value::as_str) == Some(n)),
        None => outputs.first(),
    }
    .ok_or_else(|| missing(format!("output {}", name.unwrap_or("(first)"))))?;
    let data = out
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| missing("output `data` array"))?;
    let shape: Vec<usize> = out
        .get("shape")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        })
        .unwrap_or_else(|| vec![data.len()]);
    match shape.as_slice() {
        [n, k] if n * k == data.len() && *k > 0 => data
            .chunks(*k)
            .map(|row| scores_prediction(row).ok_or_else(|| missing("numeric output rows")))
            .collect(),
        [n] | [n, 1] if *n == data.len() => data
            .iter()
            .map(|d| any_prediction(d).ok_or_else(|| missing("label output values")))
            .collect(),
        _ => Err(missing(format!(
            "output with shape {shape:?} matching {} values",
            data.len()
        ))),
    }
}

/// A route's mapping from upstream classes to detector label ids.
#[derive(Debug, Clone, Default)]
pub struct LabelMap {
    names: Vec<String>,
    ids: BTreeMap<i64, u32>,
    num_classes: u32,
}

impl LabelMap {
    /// `names[i]` is label id `i`; `ids` renumbers upstream indices.
    pub fn new(names: Vec<String>, ids: &BTreeMap<String, u32>, num_classes: u32) -> Self {
        let ids = ids
            .iter()
            .filter_map(|(k, v)| k.parse::<i64>().ok().map(|k| (k, *v)))
            .collect();
        Self {
            names,
            ids,
            num_classes,
        }
    }

    /// Detector label id and class name, or why the label is outside the map.
    pub fn resolve(&self, label: &UpstreamLabel) -> Result<(u32, Option<String>), String> {
        let id = match label {
            UpstreamLabel::Name(n) => match self.names.iter().position(|x| x == n) {
                Some(i) => i as u32,
                None => match n.parse::<i64>() {
                    Ok(i) => self.index(i)?,
                    Err(_) => return Err(format!("class `{n}` is not in the route's label list")),
                },
            },
            UpstreamLabel::Index(i) => self.index(*i)?,
        };
        Ok((id, self.names.get(id as usize).cloned()))
    }

    fn index(&self, i: i64) -> Result<u32, String> {
        let id = match self.ids.get(&i) {
            Some(id) => i64::from(*id),
            None if self.ids.is_empty() => i,
            None => return Err(format!("class {i} is not in the route's label_ids")),
        };
        if (0..i64::from(self.num_classes)).contains(&id) {
            Ok(id as u32)
        } else {
            Err(format!(
                "class {i} is outside the detector's 0..{} labels",
                self.num_classes
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(i: i64) -> UpstreamLabel {
        UpstreamLabel::Index(i)
    }

    #[test]
    fn pointer_walks_as_serde_json_does() {
        let doc: Value = serde_json::from_str(
            r#"{"a": {"b": [10, 11, {"c": 3}]}, "": 1, "x/y": 2, "m~n": 4, "01": 5, "s": "t"}"#,
        )
        .unwrap();
        let cases = [
            "", "/a", "/a/b", "/a/b/0", "/a/b/2/c", "/a/b/3", "/a/b/01", "/a/b/+1", "/a/b/-1",
            "/a/b/x", "/", "/x~1y", "/m~0n", "/01", "/s/0", "/missing", "a", "/a/", "/a//b",
        ];
        for p in cases {
            let want = if p.is_empty() {
                Some(&doc)
            } else {
                doc.pointer(p)
            };
            assert_eq!(pointer(&doc, p), want, "pointer {p:?}");
        }
    }

    #[test]
    fn torchserve_top_key() {
        let p = extract_predictions(
            &ResponseAdapterConfig::TopKey {
                pointer: String::new(),
            },
            br#"{"Dress":0.7,"Bag":0.2}"#,
        )
        .unwrap();
        assert_eq!(p[0].label, UpstreamLabel::Name("Dress".into()));
    }

    #[test]
    fn argmax_batch_keeps_logits() {
        let p = extract_predictions(
            &ResponseAdapterConfig::Argmax {
                pointer: "/scores".into(),
            },
            br#"{"scores":[[0.1,0.9],[2,1]]}"#,
        )
        .unwrap();
        assert_eq!(
            p.iter().map(|x| x.label.clone()).collect::<Vec<_>>(),
            vec![idx(1), idx(0)]
        );
        assert_eq!(p[1].logits.as_deref(), Some(&[2.0, 1.0][..]));
    }

    #[test]
    fn oip_v2_matrix_and_vector() {
        let cfg = ResponseAdapterConfig::OipV2 { output: None };
        let m =
            br#"{"outputs":[{"name":"p","shape":[2,3],"datatype":"FP32","data":[0,1,0, 5,0,0]}]}"#;
        let p = extract_predictions(&cfg, m).unwrap();
        assert_eq!(
            p.iter().map(|x| x.label.clone()).collect::<Vec<_>>(),
            vec![idx(1), idx(0)]
        );
        let v = br#"{"outputs":[{"name":"c","shape":[2],"datatype":"INT64","data":[4,7]}]}"#;
        assert_eq!(extract_predictions(&cfg, v).unwrap()[1].label, idx(7));
        let bad = br#"{"outputs":[{"name":"c","shape":[3,3],"data":[1,2]}]}"#;
        assert!(extract_predictions(&cfg, bad).is_err());
    }

    #[test]
    fn label_map_names_ids_and_bounds() {
        let ids: BTreeMap<String, u32> = [("100".to_string(), 0), ("101".to_string(), 1)].into();
        let m = LabelMap::new(vec!["a".into(), "b".into()], &ids, 2);
        assert_eq!(m.resolve(&idx(101)).unwrap(), (1, Some("b".into())));
        assert!(m.resolve(&idx(1)).is_err());
        assert_eq!(m.resolve(&UpstreamLabel::Name("a".into())).unwrap().0, 0);
        assert!(m.resolve(&UpstreamLabel::Name("zebra".into())).is_err());
        let plain = LabelMap::new(vec![], &BTreeMap::new(), 10);
        assert!(plain.resolve(&idx(10)).is_err());
        assert!(plain.resolve(&idx(-1)).is_err());
        assert_eq!(plain.resolve(&idx(9)).unwrap(), (9, None));
    }
}
