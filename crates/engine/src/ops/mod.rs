//! Differentiable tensor ops that candle 0.11 lacks or gets wrong (see candle-notes §3).

pub mod conv;
pub mod pool;
pub mod resize;
