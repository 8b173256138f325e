//! Differentiable tensor ops that candle 0.11 lacks or gets wrong (see candle-notes §3).

pub mod activation;
pub mod attention;
pub mod conv;
mod dense;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod resample2x;
pub mod resize;
mod winograd;
