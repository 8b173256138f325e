//! The fast path of the two response adapters that read a label from numbers (`argmax` and
//! `top_key`): the route's JSON pointer is followed while the answer is parsed, everything beside
//! it is skipped, and no `serde_json::Value` tree is built. Building that tree (a map node and a
//! `String` per key, a `Value` per score) was the largest single cost of a cache hit after the
//! HTTP stack itself.
//!
//! The fast path only ever answers with what the general path in [`super::response`] would
//! answer: duplicate keys resolve to the last one, and ties in `top_key` go to the greatest class
//! name, as the sorted map of a parsed `Value` gives them. Whatever it cannot settle (escaped
//! pointers, a shape that is not the expected one, invalid JSON) it hands to the general path,
//! which also words the error. One difference is deliberate: a number beyond `f64`'s range that
//! lies off the pointer's path is skipped unread (JSON allows it), where a parsed `Value` refuses
//! the whole answer.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::response::{Prediction, argmax_prediction, array_index, top_class};
use crate::config::ResponseAdapterConfig;

/// The predictions, when the fast path can read them; `None` sends the answer to the general path.
pub(super) fn predictions(cfg: &ResponseAdapterConfig, body: &[u8]) -> Option<Vec<Prediction>> {
    match cfg {
        ResponseAdapterConfig::Argmax { pointer } => walk(pointer, body, Scores),
        ResponseAdapterConfig::TopKey { pointer } => walk(pointer, body, TopKey),
        _ => None,
    }
}

fn walk<T: Target>(pointer: &str, body: &[u8], target: T) -> Option<Vec<Prediction>> {
    // `~0`/`~1` escapes and relative pointers are rare: the general path has them.
    if pointer.contains('~') || !(pointer.is_empty() || pointer.starts_with('/')) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = Walk {
        rest: pointer,
        target,
    }
    .deserialize(&mut de)
    .ok()?;
    // Trailing bytes make the whole answer invalid JSON, as the general path would find.
    de.end().ok()?;
    found
}

/// What the pointer leads to: read from there, or `None`.
trait Target: Copy + for<'de> DeserializeSeed<'de, Value = Option<Vec<Prediction>>> {}
impl<T> Target for T where T: Copy + for<'de> DeserializeSeed<'de, Value = Option<Vec<Prediction>>> {}

/// Follows `rest` (a pointer suffix, `/`-separated) through the document.
#[derive(Clone, Copy)]
struct Walk<'p, T> {
    rest: &'p str,
    target: T,
}

impl<'p, T> Walk<'p, T> {
    /// The next token, and the pointer after it.
    fn split(&self) -> (&'p str, &'p str) {
        let s = &self.rest[1..];
        match s.find('/') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        }
    }
}

impl<'de, T: Target> DeserializeSeed<'de> for Walk<'_, T> {
    type Value = Option<Vec<Prediction>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.rest.is_empty() {
            self.target.deserialize(d)
        } else {
            // A scalar where the pointer goes on is a type error: the general path says so.
            d.deserialize_any(self)
        }
    }
}

impl<'de, T: Target> Visitor<'de> for Walk<'_, T> {
    type Value = Option<Vec<Prediction>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object or array on the pointer's path")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (token, rest) = self.split();
        let mut found = None;
        while let Some(key) = map.next_key_seed(Key)? {
            if key == token {
                // A later duplicate replaces an earlier one, as in a parsed `Value`.
                found = map.next_value_seed(Walk { rest, ..self })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (token, rest) = self.split();
        let index = array_index(token);
        let mut found = None;
        for i in 0.. {
            if index == Some(i) {
                match seq.next_element_seed(Walk { rest, ..self })? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
        }
        Ok(found)
    }
}

/// An object key, borrowed from the answer unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// `argmax`: one array of scores, or an array of score rows (a batch).
#[derive(Clone, Copy)]
struct Scores;

impl<'de> DeserializeSeed<'de> for Scores {
    type Value = Option<Vec<Prediction>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Scores {
    type Value = Option<Vec<Prediction>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of numbers or of number rows")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut flat = Vec::new();
        let mut rows = Vec::new();
        while let Some(e) = seq.next_element_seed(ScoreOrRow)? {
            match e {
                Element::Score(x) if rows.is_empty() => flat.push(x),
                Element::Row(r) if flat.is_empty() => rows.push(r),
                // Numbers and rows mixed: the general path rejects it.
                _ => return Ok(None),
            }
        }
        if rows.is_empty() {
            Ok(argmax_prediction(flat).map(|p| vec![p]))
        } else {
            Ok(rows.into_iter().map(argmax_prediction).collect())
        }
    }
}

enum Element {
    Score(f32),
    Row(Vec<f32>),
}

/// One element of a score array: a number (read as `f64`, then `f32`, as `Value::as_f64` and a
/// cast give it) or a row of numbers.
struct ScoreOrRow;

impl<'de> DeserializeSeed<'de> for ScoreOrRow {
    type Value = Element;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScoreOrRow {
    type Value = Element;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }
    fn visit_i64<E>(self, v: i64) -> Result<Element, E> {
        Ok(Element::Score(v as f64 as f32))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Element, E> {
        Ok(Element::Score(v as f64 as f32))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Element, E> {
        Ok(Element::Score(v as f32))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
        let mut row = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(x) = seq.next_element::<f64>()? {
            row.push(x as f32);
        }
        Ok(Element::Row(row))
    }
}

/// `top_key`: a `{class: probability}` object, or an array of them (a batch).
#[derive(Clone, Copy)]
struct TopKey;

impl<'de> DeserializeSeed<'de> for TopKey {
    type Value = Option<Vec<Prediction>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopKey {
    type Value = Option<Vec<Prediction>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a {class: probability} object or an array of them")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(top_key(map)?.map(|p| vec![p]))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(p) = seq.next_element_seed(ClassMap)? {
            match p {
                Some(p) => out.push(p),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }
}

/// One `{class: probability}` object of a batch.
struct ClassMap;

impl<'de> DeserializeSeed<'de> for ClassMap {
    type Value = Option<Prediction>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ClassMap {
    type Value = Option<Prediction>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a {class: probability} object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        top_key(map)
    }
}

/// The class with the highest probability; entries that are not numbers do not count.
fn top_key<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Prediction>, A::Error> {
    let mut entries: Vec<(Cow<'de, str>, Option<f64>)> = Vec::new();
    while let Some(k) = map.next_key_seed(Key)? {
        entries.push((k, map.next_value_seed(Probability)?));
    }
    // A parsed `Value` keeps the last of duplicate keys and iterates in key order: a stable sort
    // by key, keeping the last entry of each key, gives `top_class` the same pairs.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let kept = entries.iter().enumerate().filter_map(|(i, (k, p))| {
        let superseded = entries.get(i + 1).is_some_and(|next| next.0 == *k);
        p.filter(|_| !superseded).map(|p| (k.as_ref(), p))
    });
    Ok(top_class(kept))
}

/// A probability: a number, or `None` for any other value (skipped, as the general path does).
struct Probability;

impl<'de> DeserializeSeed<'de> for Probability {
    type Value = Option<f64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Probability {
    type Value = Option<f64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::response::{ResponseAdapterError, UpstreamLabel, parsed_predictions};

    /// A small deterministic generator of JSON answers: nested objects and arrays on the paths
    /// the pointers below take, duplicate and escaped keys, tied probabilities, integers, floats
    /// and numbers out of `f64` range, and shapes the adapters reject.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }

        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.next(xs.len() as u64) as usize]
        }

        fn number(&mut self) -> String {
            let n = [
                "0",
                "1",
                "-3",
                "0.5",
                "0.5",
                "2.5e-3",
                "-1E2",
                "7.25",
                "18446744073709551615",
                "-9223372036854775808",
                "1e400",
                "3",
            ];
            self.pick(&n).to_string()
        }

        fn value(&mut self, depth: u32) -> String {
            let leaf = depth == 0;
            match self.next(if leaf { 4 } else { 9 }) {
                0 => self.number(),
                1 => self
                    .pick(&["\"x\"", "true", "null", "\"\\u0041\""])
                    .to_string(),
                2 => self.list(|g| g.number()),
                3 => self.classes(),
                4 => self.list(|g| g.list(|g| g.number())),
                5 => self.list(|g| g.classes()),
                6 => self.list(|g| g.value(depth - 1)),
                _ => {
                    let keys = ["scores", "a", "b", "0", "", "sc\\u006fres", "scores"];
                    let n = self.next(4);
                    let fields: Vec<String> = (0..n)
                        .map(|_| format!("\"{}\": {}", self.pick(&keys), self.value(depth - 1)))
                        .collect();
                    format!("{{{}}}", fields.join(", "))
                }
            }
        }

        fn list(&mut self, mut item: impl FnMut(&mut Self) -> String) -> String {
            let n = self.next(5);
            let items: Vec<String> = (0..n).map(|_| item(self)).collect();
            format!("[{}]", items.join(","))
        }

        fn classes(&mut self) -> String {
            let names = ["Bag", "Coat", "Dress", "Bag", "a\\\"b", "B\\u0061g", "Coat"];
            let probs = ["0.1", "0.5", "0.5", "1", "2", "\"high\"", "null", "[1]"];
            let n = self.next(5);
            let fields: Vec<String> = (0..n)
                .map(|_| format!("\"{}\": {}", self.pick(&names), self.pick(&probs)))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
    }

    #[test]
    fn the_fast_path_answers_only_what_the_general_path_answers() {
        let pointers = [
            "",
            "/scores",
            "/a/0",
            "/a/scores",
            "/0",
            "/",
            "/a/1/b",
            "/a/01",
            "/scores/0",
        ];
        let mut g = Gen(0x2545_F491_4F6C_DD1D);
        let (mut readable, mut fast) = (0, 0);
        for _ in 0..20_000 {
            let doc = g.value(4);
            for p in pointers {
                let cfgs = [
                    ResponseAdapterConfig::Argmax { pointer: p.into() },
                    ResponseAdapterConfig::TopKey { pointer: p.into() },
                ];
                for cfg in cfgs {
                    let general = parsed_predictions(&cfg, doc.as_bytes());
                    let quick = predictions(&cfg, doc.as_bytes());
                    if let Some(q) = &quick {
                        fast += 1;
                        // The one known difference: a number beyond `f64` off the pointer's path
                        // is skipped unread here (RFC 8259 allows it), while a parsed `Value`
                        // refuses the whole answer.
                        if general == Err(ResponseAdapterError::NotJson) && doc.contains("1e400") {
                            continue;
                        }
                        assert_eq!(Ok(q), general.as_ref(), "{cfg:?} on {doc}");
                    }
                    readable += usize::from(general.is_ok());
                }
            }
        }
        // Most readable answers take the fast path (the rest: an earlier duplicate key that is
        // not walkable, or a number out of range on the path); the test must exercise both.
        assert!(
            readable > 2_000,
            "only {readable} readable answers generated"
        );
        assert!(
            fast * 10 >= readable * 9,
            "fast path took {fast} of {readable}"
        );
    }

    #[test]
    fn duplicates_ties_escapes_and_trailing_bytes() {
        let top = |body: &str| {
            let cfg = ResponseAdapterConfig::TopKey {
                pointer: String::new(),
            };
            predictions(&cfg, body.as_bytes()).map(|p| p[0].label.clone())
        };
        let name = |s: &str| Some(UpstreamLabel::Name(s.into()));
        // Ties go to the greatest name; a later duplicate replaces an earlier one.
        assert_eq!(top(r#"{"Coat": 0.5, "Bag": 0.5}"#), name("Coat"));
        assert_eq!(
            top(r#"{"Coat": 0.9, "Bag": 0.5, "Coat": 0.1}"#),
            name("Bag")
        );
        assert_eq!(
            top(r#"{"Coat": 0.9, "Bag": 0.5, "Coat": "x"}"#),
            name("Bag")
        );
        assert_eq!(top(r#"{"B\u0061g": 0.9}"#), name("Bag"));
        assert_eq!(top(r#"{"Bag": 0.9} x"#), None, "invalid JSON: general path");
        let scores = |p: &str, body: &str| {
            let cfg = ResponseAdapterConfig::Argmax { pointer: p.into() };
            predictions(&cfg, body.as_bytes())
        };
        let got = scores("/s", r#"{"s": [9, 1], "s": [[1, 2], [4, 3]]}"#).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].logits.as_deref(), Some(&[4.0, 3.0][..]));
        assert!(scores("/s", r#"{"s": [1, [2]]}"#).is_none());
        assert!(
            scores("/x~1y", r#"{"x/y": [1]}"#).is_none(),
            "escaped pointer: general path"
        );
    }
}
