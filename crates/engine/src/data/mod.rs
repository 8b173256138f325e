//! Real dataset loaders.
