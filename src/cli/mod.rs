//! Command-line subcommands that are more than a few lines, one module each.

#[cfg(feature = "fetch")]
pub mod fetch;
pub mod models;
