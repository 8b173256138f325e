//! Pooling with correct gradients.
