//! Each bench case in a fresh child process of the same example: rayon's pool size is fixed at
//! first use, and a peak-RSS reading must not see memory an earlier case left in the allocator.

/// Runs this executable again with `args`, `case_var=case` and `RAYON_NUM_THREADS=threads`;
/// returns the JSON line the child printed, raw and parsed.
pub fn run_child(
    args: &[String],
    case_var: &str,
    case: &str,
    threads: &str,
) -> Result<(String, serde_json::Value), Box<dyn std::error::Error>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .env(case_var, case)
        .env("RAYON_NUM_THREADS", threads)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "case {case} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let line = String::from_utf8(out.stdout)?.trim().to_string();
    let value = serde_json::from_str(&line)?;
    Ok((line, value))
}

/// Appends one line to a JSON-lines file.
pub fn append_line(path: &str, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}
