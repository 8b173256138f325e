//! Image decoding with limits checked from the header, before any pixel is decoded.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

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
    decode_within(bytes, max_pixels, u64::MAX)?
        .ok_or_else(|| DecodeError::Invalid("image larger than u64::MAX pixels".into()))
}

/// Like [`decode`], but returns `Ok(None)` without decoding any pixel when the image has more
/// than `budget` pixels, so a caller can decode small images in place and hand big ones to a
/// thread that may block.
pub fn decode_within(
    bytes: &[u8],
    max_pixels: u64,
    budget: u64,
) -> Result<Option<Image>, DecodeError> {
    let invalid = |e: image::ImageError| DecodeError::Invalid(e.to_string());
    // One header parse serves the limit check and the decode.
    let mut decoder = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Invalid(e.to_string()))?
        .into_decoder()
        .map_err(invalid)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit: max_pixels,
        });
    }
    if pixels > budget {
        return Ok(None);
    }
    let mut limits = Limits::default();
    // Headroom for 16-bit RGBA intermediates; the pixel check above is the real bound.
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    decoder.set_limits(limits).map_err(invalid)?;
    let img = DynamicImage::from_decoder(decoder).map_err(invalid)?;
    let gray = !img.color().has_color();
    Ok(Some(if gray {
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
    }))
}
