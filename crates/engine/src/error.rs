//! The engine's error type. The guard maps it to HTTP once, at its edge.

/// Everything that can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading a file (weights, data) failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint does not match the architecture. Lists every offending tensor by name.
    #[error("checkpoint {path} does not match the model: {detail}")]
    WeightMismatch { path: String, detail: String },
    /// A file is not in the format it claims to be.
    #[error("{path}: malformed {what}: {detail}")]
    Format {
        path: String,
        what: &'static str,
        detail: String,
    },
    /// The caller passed something the algorithm cannot work with.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A recipe or model configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
