//! Resident-memory readings for the `bench_*` examples (Linux `/proc/self`).

/// A `kB` field of `/proc/self/status` (e.g. `VmRSS:`, `VmHWM:`), 0 if unreadable.
pub fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0), so the peak afterwards
/// is the peak of what runs next alone.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak RSS (MiB) since the last [`reset_peak_rss`] above `base_kib`; `None` when the reset failed.
pub fn peak_delta_mib(reset_ok: bool, base_kib: u64) -> Option<f64> {
    reset_ok.then(|| status_kib("VmHWM:").saturating_sub(base_kib) as f64 / 1024.0)
}
