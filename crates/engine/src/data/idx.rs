//! The IDX format of (Fashion-)MNIST: a big-endian header `00 00 TYPE NDIM`, NDIM big-endian u32
//! dimensions, then the values. Only unsigned bytes (TYPE 0x08) occur in these datasets.

use std::path::Path;

use super::{format_err, read_gzip};
use crate::Result;

const TYPE_U8: u8 = 0x08;

/// Reads a gzip'd IDX file of unsigned bytes: its dimensions and its values. `expected_ndim`
/// guards against passing a label file where images are expected (and vice versa).
pub fn read_idx(path: &Path, expected_ndim: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = read_gzip(path)?;
    let bad = |detail: String| format_err(path, "IDX file", detail);
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes, shorter than the header",
            bytes.len()
        )));
    }
    let [z0, z1, ty, ndim] = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if z0 != 0 || z1 != 0 {
        return Err(bad(format!("magic {z0:#04x}{z1:02x}, expected 0x0000")));
    }
    if ty != TYPE_U8 {
        return Err(bad(format!(
            "value type {ty:#04x}, only unsigned bytes (0x08) are supported"
        )));
    }
    let ndim = usize::from(ndim);
    if ndim != expected_ndim {
        return Err(bad(format!("{ndim} dimensions, expected {expected_ndim}")));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let values = bytes.len() - header;
    if values != count {
        return Err(bad(format!(
            "dimensions {dims:?} need {count} values, the file holds {values}"
        )));
    }
    let mut data = bytes;
    data.drain(..header);
    Ok((dims, data))
}
