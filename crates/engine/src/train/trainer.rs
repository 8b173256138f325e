//! The training loop: resumes from a checkpoint folder, stops cleanly at a time budget,
//! checkpoints periodically and at the end, shows loss and ETA on a progress bar.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWParams};
use super::checkpoint::{self, LossPoint, TrainState};
use super::data::{Augment, BatchOrder, InMemoryDataset};
use super::ema::{Ema, snapshot};
use super::objective::Objective;
use super::rng::{Purpose, derived};
use crate::{EngineError, Result};

/// Learning rate as a function of the step.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// Linear warm-up for `warmup` steps, then constant.
    Warmup {
        warmup: u64,
    },
    /// Linear warm-up, then cosine decay to `min_ratio`·lr at the last step.
    WarmupCosine {
        warmup: u64,
        min_ratio: f64,
    },
}

impl LrSchedule {
    pub fn factor(&self, step: u64, total: u64) -> f64 {
        let warm = |w: u64| {
            if step < w {
                (step + 1) as f64 / w as f64
            } else {
                1.0
            }
        };
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Warmup { warmup } => warm(warmup),
            LrSchedule::WarmupCosine { warmup, min_ratio } => {
                if step < warmup {
                    return warm(warmup);
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let p = ((step - warmup) as f64 / span).min(1.0);
                min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}

/// What defines the run; stored in the checkpoint and checked on resume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub seed: u64,
    pub batch_size: usize,
    pub total_steps: u64,
    pub optimizer: AdamWParams,
    pub lr_schedule: LrSchedule,
    pub ema_decay: f64,
    pub augment: Augment,
    /// Steps per point of the recorded loss curve.
    pub log_every: u64,
}

/// How this invocation runs; not part of the run's identity.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stop cleanly (and checkpoint) before this much wall time has passed.
    pub budget: Option<Duration>,
    /// Where checkpoints live; an existing checkpoint there is resumed.
    pub checkpoint_dir: Option<PathBuf>,
    pub checkpoint_every: Duration,
    /// Stop after this step (for tests and staged runs).
    pub stop_at_step: Option<u64>,
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            budget: None,
            checkpoint_dir: None,
            checkpoint_every: Duration::from_secs(300),
            stop_at_step: None,
            progress: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Finished,
    Budget,
    StopAt,
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub stop: StopReason,
    pub steps_run: u64,
    pub step: u64,
    pub secs: f64,
    pub last_loss: Option<f32>,
}

/// A training run over the variables of `varmap` (the model must already be built on it).
pub struct Trainer<O> {
    varmap: VarMap,
    config: TrainConfig,
    opts: RunOptions,
    data: InMemoryDataset,
    objective: O,
    device: Device,
    adamw: AdamW,
    ema: Ema,
    order: BatchOrder,
    state: TrainState,
}

impl<O: Objective> Trainer<O> {
    /// Sets up the run, resuming from `opts.checkpoint_dir` when it holds a checkpoint.
    pub fn new(
        varmap: VarMap,
        config: TrainConfig,
        opts: RunOptions,
        data: InMemoryDataset,
        objective: O,
        device: Device,
    ) -> Result<Self> {
        let mut adamw = AdamW::from_varmap(&varmap, config.optimizer)?;
        let mut ema = Ema::new(&varmap, config.ema_decay)?;
        let order = BatchOrder::new(data.len(), config.batch_size, config.seed)?;
        let config_json = serde_json::to_value(&config)
            .map_err(|e| EngineError::Config(format!("cannot record the config: {e}")))?;
        let mut state = TrainState {
            step: 0,
            seed: config.seed,
            elapsed_secs: 0.0,
            loss_log: Vec::new(),
            loss_window: (0.0, 0),
            config: config_json,
            tensors_blake3: String::new(),
        };
        if let Some(dir) = &opts.checkpoint_dir
            && let Some(loaded) = checkpoint::load(dir, &device)?
        {
            check_compatible(&loaded.state, &config)?;
            checkpoint::restore_params(&varmap, &loaded.tensors)?;
            adamw.load_state(&loaded.tensors, loaded.state.step)?;
            ema.load_state(&loaded.tensors)?;
            tracing::info!(step = loaded.state.step, dir = %dir.display(), "resumed");
            state = TrainState {
                config: state.config,
                ..loaded.state
            };
        }
        Ok(Self {
            varmap,
            config,
            opts,
            data,
            objective,
            device,
            adamw,
            ema,
            order,
            state,
        })
    }

    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Where the parameters live and the steps run.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The training set the run draws its batches from.
    pub fn data(&self) -> &InMemoryDataset {
        &self.data
    }

    pub fn objective(&self) -> &O {
        &self.objective
    }

    pub fn state(&self) -> &TrainState {
        &self.state
    }

    pub fn ema_weights(&self) -> &BTreeMap<String, Tensor> {
        self.ema.weights()
    }

    pub fn raw_weights(&self) -> Result<BTreeMap<String, Tensor>> {
        snapshot(&self.varmap)
    }

    /// Runs one optimiser step and returns its loss.
    pub fn train_step(&mut self) -> Result<f32> {
        let step = self.state.step;
        let mut rng = derived(self.config.seed, Purpose::Step(step));
        let idx = self.order.indices(step).to_vec();
        let (x, labels) = self
            .data
            .batch(&idx, &self.config.augment, &mut rng, &self.device)?;
        let loss = self.objective.loss(&x, &labels, &mut rng)?;
        let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(EngineError::InvalidInput(format!(
                "training loss became {value} at step {step}; lower the learning rate"
            )));
        }
        let grads = loss.backward()?;
        let lr = self.config.optimizer.lr
            * self
                .config
                .lr_schedule
                .factor(step, self.config.total_steps);
        self.adamw.set_lr(lr);
        self.adamw.step(&grads)?;
        self.state.step = step + 1;
        self.ema.update(&self.varmap, self.state.step)?;
        Ok(value)
    }

    /// Writes a checkpoint if the run has a checkpoint folder.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        if let Some(dir) = self.opts.checkpoint_dir.clone() {
            checkpoint::save(&dir, &self.varmap, &self.adamw, &self.ema, &mut self.state)?;
            tracing::info!(step = self.state.step, dir = %dir.display(), "checkpoint written");
        }
        Ok(())
    }

    /// Trains until `total_steps`, the stop step or the time budget, then checkpoints.
    pub fn run(&mut self) -> Result<RunSummary> {
        let start = Instant::now();
        let start_step = self.state.step;
        let base_elapsed = self.state.elapsed_secs;
        let mut last_ckpt = Instant::now();
        let mut last_loss = None;
        let mut smoothed: Option<f32> = None;
        let bar = self.progress_bar()?;
        let stop = loop {
            if self.state.step >= self.config.total_steps {
                break StopReason::Finished;
            }
            if self.opts.stop_at_step.is_some_and(|s| self.state.step >= s) {
                break StopReason::StopAt;
            }
            if let Some(budget) = self.opts.budget {
                let done = self.state.step - start_step;
                let per_step = start.elapsed().as_secs_f64() / done.max(1) as f64;
                let next = if done == 0 { 0.0 } else { per_step };
                if start.elapsed().as_secs_f64() + next >= budget.as_secs_f64() {
                    break StopReason::Budget;
                }
            }
            let loss = self.train_step()?;
            last_loss = Some(loss);
            let s = smoothed.map_or(loss, |m| 0.98 * m + 0.02 * loss);
            smoothed = Some(s);
            self.record_loss(loss);
            bar.set_position(self.state.step);
            bar.set_message(self.bar_message(s, start));
            if last_ckpt.elapsed() >= self.opts.checkpoint_every {
                self.state.elapsed_secs = base_elapsed + start.elapsed().as_secs_f64();
                self.save_checkpoint()?;
                last_ckpt = Instant::now();
            }
        };
        bar.finish();
        self.state.elapsed_secs = base_elapsed + start.elapsed().as_secs_f64();
        self.save_checkpoint()?;
        Ok(RunSummary {
            stop,
            steps_run: self.state.step - start_step,
            step: self.state.step,
            secs: start.elapsed().as_secs_f64(),
            last_loss,
        })
    }

    fn record_loss(&mut self, loss: f32) {
        let (sum, n) = self.state.loss_window;
        let (sum, n) = (sum + loss as f64, n + 1);
        if self.state.step.is_multiple_of(self.config.log_every.max(1)) {
            self.state.loss_log.push(LossPoint {
                step: self.state.step,
                loss: (sum / n as f64) as f32,
            });
            self.state.loss_window = (0.0, 0);
        } else {
            self.state.loss_window = (sum, n);
        }
    }

    fn progress_bar(&self) -> Result<ProgressBar> {
        if !self.opts.progress {
            return Ok(ProgressBar::hidden());
        }
        let style = ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} ({per_sec}, ETA {eta}) {msg}",
        )
        .map_err(|e| EngineError::Config(format!("progress bar template: {e}")))?;
        let bar = ProgressBar::new(self.config.total_steps).with_style(style);
        bar.set_position(self.state.step);
        Ok(bar)
    }

    fn bar_message(&self, loss: f32, start: Instant) -> String {
        match self.opts.budget {
            Some(b) => {
                let left = b.saturating_sub(start.elapsed()).as_secs();
                format!(
                    "loss {loss:.4} | budget left {}m{:02}s",
                    left / 60,
                    left % 60
                )
            }
            None => format!("loss {loss:.4}"),
        }
    }
}

/// A resumed run must continue the same run; only its length and logging may change.
fn check_compatible(saved: &TrainState, config: &TrainConfig) -> Result<()> {
    let old: TrainConfig = serde_json::from_value(saved.config.clone())
        .map_err(|e| EngineError::Config(format!("checkpoint config is unreadable: {e}")))?;
    let same = TrainConfig {
        total_steps: config.total_steps,
        log_every: config.log_every,
        ..old.clone()
    };
    if &same != config {
        return Err(EngineError::Config(format!(
            "the checkpoint was written by a different run configuration ({old:?}); \
             resume with the same settings or use a new output folder"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_min() {
        let s = LrSchedule::WarmupCosine {
            warmup: 10,
            min_ratio: 0.1,
        };
        assert!((s.factor(0, 110) - 0.1).abs() < 1e-12);
        assert!((s.factor(9, 110) - 1.0).abs() < 1e-12);
        assert!((s.factor(10, 110) - 1.0).abs() < 1e-12);
        assert!((s.factor(60, 110) - 0.55).abs() < 1e-12);
        assert!((s.factor(110, 110) - 0.1).abs() < 1e-12);
    }
}
