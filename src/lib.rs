//! The DiffGuard guard: a reverse proxy that scores every classifier prediction for OOD.
