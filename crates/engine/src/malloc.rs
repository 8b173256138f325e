//! Process-wide allocator setting for running the networks on CPU.
//!
//! glibc's malloc serves every block ≥ 128 KiB (a threshold it raises on its own only up to
//! 32 MiB) with a fresh `mmap` and unmaps it on free. A network call allocates its activations
//! and gradients anew each time (candle tensors own their storage), so every call page-faults and
//! zeroes megabytes again: measured on ADM at 64² this is ~40 % of its forward CPU time. Serving
//! those blocks from the heap and not trimming it keeps the pages mapped between calls.
//!
//! The price: the heap does not shrink after a peak (a one-off large batch keeps its memory
//! until exit). A detector process runs the same batch sizes again and again, so its peak recurs
//! anyway. Anyone who wants glibc's behaviour back sets `MALLOC_MMAP_THRESHOLD_` or
//! `MALLOC_TRIM_THRESHOLD_` themselves (glibc reads them at start-up), and this leaves them alone.

/// Blocks below this come from the heap; larger ones still get their own mapping.
const MMAP_THRESHOLD: i32 = 1 << 30;
/// Free memory at the top of the heap is returned to the kernel only beyond this.
const TRIM_THRESHOLD: i32 = 1 << 30;

/// What [`keep_large_buffers`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MallocTuning {
    /// The thresholds are set.
    Applied,
    /// The environment sets glibc's own variables; they win.
    LeftToEnvironment,
    /// Not glibc, or glibc refused the setting.
    Unsupported,
}

/// Keeps large freed blocks mapped for the next network call (see the module docs). Call it once,
/// early in `main`, before the networks run.
pub fn keep_large_buffers() -> MallocTuning {
    let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if user_set {
        return MallocTuning::LeftToEnvironment;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> MallocTuning {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    };
    if ok {
        MallocTuning::Applied
    } else {
        MallocTuning::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> MallocTuning {
    let _ = (MMAP_THRESHOLD, TRIM_THRESHOLD);
    MallocTuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes glibc currently holds in separately mmap'd blocks.
    fn mmapped_bytes() -> usize {
        // SAFETY: mallinfo2 only reads allocator statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    #[test]
    fn a_large_block_comes_from_the_heap() {
        if keep_large_buffers() != MallocTuning::Applied {
            eprintln!("skipped: glibc tuning not applied here");
            return;
        }
        // glibc's default would mmap this 8 MiB block (threshold 128 KiB, at most 32 MiB).
        let before = mmapped_bytes();
        let block = vec![1u8; 8 << 20];
        let during = mmapped_bytes();
        std::hint::black_box(&block);
        assert!(
            during < before + (8 << 20),
            "the block was mmap'd: {before} -> {during} bytes"
        );
    }
}
