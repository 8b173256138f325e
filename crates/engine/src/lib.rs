//! DiffGuard engine: the algorithm of `diffguard-spec.md` on candle. Knows nothing of HTTP.
