//! The images of one request, read once: each image's content hash, and its pixels when they are
//! needed. A verdict-cache hit needs only the hash, and decoding a PNG was over a third of the
//! guard's CPU per cache hit, so an image this guard has already decoded within its limits is
//! not decoded again before the upstream call; its pixels are decoded only on a cache miss.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;

use super::decode::{self, DecodeError};
use super::detector::Image;
use crate::config::RequestAdapterConfig;
use crate::error::GuardError;
use crate::proxy::request::extract_images;
use crate::telemetry::metric;

/// Largest encoded image decoded on the request's task: bounds the header parse done there.
const INLINE_DECODE_BYTES: usize = 16 * 1024;
/// Largest image (width × height) decoded on the request's task; 64×64 decodes in tens of µs.
const INLINE_DECODE_PIXELS: u64 = 64 * 64;
/// Content hashes remembered as decodable. An entry is ~100 bytes, so this bounds the set near
/// 1 MB; a forgotten hash costs one more decode, never a wrong answer.
const KNOWN_CAPACITY: u64 = 10_000;

/// One image of a request.
#[derive(Clone)]
pub struct ImageInput {
    hash: blake3::Hash,
    pixels: Pixels,
}

#[derive(Clone)]
enum Pixels {
    Decoded(Arc<Image>),
    /// Known to decode within the limits; decoded on demand.
    Encoded(Bytes),
}

impl ImageInput {
    /// Content hash of the encoded bytes (the image part of the verdict key).
    pub fn hash(&self) -> &blake3::Hash {
        &self.hash
    }

    /// The pixels, decoding them now if reading the request skipped it.
    pub async fn pixels(&self, max_pixels: u64) -> Result<Arc<Image>, GuardError> {
        match &self.pixels {
            Pixels::Decoded(img) => Ok(img.clone()),
            Pixels::Encoded(b) => {
                let mut one = decode_all(vec![b.clone()], max_pixels).await?;
                one.pop()
                    .ok_or_else(|| GuardError::BadRequest("decoder returned no image".into()))
            }
        }
    }
}

/// Content hashes of images that decoded within this guard's limits, so they need no decode to
/// be validated again. The limits are the guard's own and fixed for its life, so a hash stays
/// valid as long as it is remembered.
#[derive(Clone)]
pub struct KnownImages {
    hashes: moka::future::Cache<[u8; 32], ()>,
}

impl KnownImages {
    /// Remembers up to `KNOWN_CAPACITY` hashes, each for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            hashes: moka::future::Cache::builder()
                .max_capacity(KNOWN_CAPACITY)
                .time_to_live(ttl)
                .build(),
        }
    }

    fn contains(&self, hash: &blake3::Hash) -> bool {
        self.hashes.contains_key(hash.as_bytes())
    }

    async fn insert(&self, hash: &blake3::Hash) {
        self.hashes.insert(*hash.as_bytes(), ()).await;
    }
}

/// Extracts the route's images from a request and validates them: an image not known to this
/// guard is decoded now (bad bytes or too many pixels are the client's error, before the
/// upstream is called); a known one is only hashed.
pub async fn read_images(
    adapter: &RequestAdapterConfig,
    known: &KnownImages,
    max_pixels: u64,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<ImageInput>, GuardError> {
    let encoded = extract_images(adapter, headers, body)
        .map_err(|e| GuardError::BadRequest(e.to_string()))?;
    // Whether each image is known is decided once, up front: a batch may hold one image twice.
    let hashed: Vec<(blake3::Hash, Bytes, bool)> = encoded
        .into_iter()
        .map(|b| {
            let h = blake3::hash(&b);
            (h, b, known.contains(&h))
        })
        .collect();
    let unknown: Vec<Bytes> = hashed
        .iter()
        .filter(|(_, _, k)| !k)
        .map(|(_, b, _)| b.clone())
        .collect();
    let mut decoded = decode_all(unknown, max_pixels).await?.into_iter();
    let mut inputs = Vec::with_capacity(hashed.len());
    for (hash, bytes, is_known) in hashed {
        let pixels = if is_known {
            Pixels::Encoded(bytes)
        } else {
            let img = decoded
                .next()
                .ok_or_else(|| GuardError::BadRequest("decoder returned too few images".into()))?;
            known.insert(&hash).await;
            Pixels::Decoded(img)
        };
        inputs.push(ImageInput { hash, pixels });
    }
    Ok(inputs)
}

/// Decodes in order. One small image (the common classifier request) is decoded right here:
/// that takes ~10 µs, less than the hand-off to the blocking pool and back. Anything bigger, or
/// a batch, decodes on the pool.
async fn decode_all(encoded: Vec<Bytes>, max_pixels: u64) -> Result<Vec<Arc<Image>>, GuardError> {
    if encoded.is_empty() {
        return Ok(Vec::new());
    }
    metrics::counter!(metric::IMAGES_DECODED).increment(encoded.len() as u64);
    if let [b] = encoded.as_slice()
        && b.len() <= INLINE_DECODE_BYTES
        && let Some(img) = decode::decode_within(b, max_pixels, INLINE_DECODE_PIXELS)?
    {
        return Ok(vec![Arc::new(img)]);
    }
    let decoded = tokio::task::spawn_blocking(move || {
        encoded
            .iter()
            .map(|b| decode::decode(b, max_pixels).map(Arc::new))
            .collect::<Result<Vec<_>, DecodeError>>()
    })
    .await
    .map_err(|e| GuardError::BadRequest(format!("decoder stopped: {e}")))?;
    Ok(decoded?)
}
