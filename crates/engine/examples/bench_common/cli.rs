//! Command-line and summary helpers shared by the `bench_*` examples.

/// The value after `flag` (`--flag VALUE`), if given.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// The element at len/2 of the sorted samples (the upper median, as PyTorch's side takes it).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
