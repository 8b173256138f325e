//! Command-line flags shared by the `train_*` examples (`--flag value` pairs, no dependency).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use diffguard_engine::train::recipes::{RecipeArgs, default_fashion_dir};

pub struct Flags(HashMap<String, String>);

impl Flags {
    /// Parses `--name value` and bare `--switch` flags.
    pub fn parse() -> Result<Self, String> {
        let mut map = HashMap::new();
        let mut it = std::env::args().skip(1).peekable();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {a:?}"))?
                .to_string();
            let value = match it.peek() {
                Some(v) if !v.starts_with("--") => it.next().unwrap_or_default(),
                _ => String::new(),
            };
            map.insert(name, value);
        }
        Ok(Self(map))
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }

    pub fn list(&self, name: &str, default: &[usize]) -> Result<Vec<usize>, String> {
        match self.0.get(name) {
            None => Ok(default.to_vec()),
            Some(v) => v
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .map_err(|_| format!("--{name}: bad list {v:?}"))
                })
                .collect(),
        }
    }

    /// The flags every recipe takes; `steps`, `batch` and `lr` defaults come from the recipe.
    pub fn recipe(&self, steps: u64, batch: usize, lr: f64) -> Result<RecipeArgs, String> {
        let out = self
            .0
            .get("out")
            .filter(|s| !s.is_empty())
            .ok_or("--out DIR is required")?;
        let budget = self.get::<f64>("budget-mins", 0.0)?;
        Ok(RecipeArgs {
            out: PathBuf::from(out),
            fashion_dir: self.get("fashion", default_fashion_dir())?,
            seed: self.get("seed", 0)?,
            steps: self.get("steps", steps)?,
            batch: self.get("batch", batch)?,
            lr: self.get("lr", lr)?,
            budget: (budget > 0.0).then(|| Duration::from_secs_f64(budget * 60.0)),
            checkpoint_every: Duration::from_secs_f64(
                self.get::<f64>("checkpoint-mins", 5.0)? * 60.0,
            ),
            progress: !self.has("no-progress"),
            test_limit: self
                .0
                .get("test-limit")
                .map(|v| v.parse())
                .transpose()
                .map_err(|_| "--test-limit N")?,
            train_limit: self
                .0
                .get("limit")
                .map(|v| v.parse())
                .transpose()
                .map_err(|_| "--limit N")?,
        })
    }
}

/// Prints `--profile` step timings under a title line naming the model and the thread count.
pub fn print_timings(title: &str, timings: &[diffguard_engine::train::recipes::StepTiming]) {
    println!("{title}, {} threads", candle_core::utils::get_num_threads());
    for t in timings {
        println!(
            "batch {:4}: {:.3} s/step wall, {:.1} images/s, {:.3} CPU-s/step",
            t.batch,
            t.secs_per_step,
            t.images_per_sec,
            t.cpu_secs_per_step.unwrap_or(f64::NAN)
        );
    }
}

/// Runs an example's `run`, printing its error and exiting with status 1 when it fails.
pub fn main_with(run: fn() -> Result<(), String>) {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
