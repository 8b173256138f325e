//! See models/mod.rs.
