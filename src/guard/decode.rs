//! Image decoding with limits checked from the header, before any pixel is decoded.

use std::io::Cursor;

use image::{ImageReader, Limits};

use super::detector::Image;

/// Why an image was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// Not a PNG/JPEG/WebP we can read, or corrupt.
    #[error("not a decodable image: {0}")]
    Invalid(String),
    /// Declared dimensions exceed `server.max_pixels` (decompression-bomb guard).
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Configured limit.
        limit: u64,
    },
}

/// Decodes to 8-bit gray (gray sources) or RGB (everything else); alpha is dropped.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Image, DecodeError> {
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    };
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit: max_pixels,
        });
    }
    let mut r = reader()?;
    let mut limits = Limits::default();
    // Headroom for 16-bit RGBA intermediates; the pixel check above is the real bound.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    r.limits(limits);
    let img = r
        .decode()
        .map_err(|e| DecodeError::Invalid(e.to_string()))?;
    let gray = !img.color().has_color();
    Ok(if gray {
        Image {
            width,
            height,
            channels: 1,
            pixels: img.into_luma8().into_raw(),
        }
    } else {
        Image {
            width,
            height,
            channels: 3,
            pixels: img.into_rgb8().into_raw(),
        }
    })
}
