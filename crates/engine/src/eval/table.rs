//! The results table laid out like the paper's (Tables 1–2): one row per detector, one column
//! per OOD set plus the average, each cell "AUROC / FPR@95" in percent, the best value of each
//! column in bold (highest AUROC, lowest FPR@95).

use serde::{Deserialize, Serialize};

use super::metrics::OodMetrics;
use crate::{EngineError, Result};

/// One detector's metrics on each OOD set, in the table's column order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRow {
    pub detector: String,
    pub metrics: Vec<OodMetrics>,
}

/// Detectors × OOD sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsTable {
    pub ood_sets: Vec<String>,
    pub rows: Vec<TableRow>,
}

impl ResultsTable {
    pub fn new(ood_sets: Vec<String>) -> Self {
        Self {
            ood_sets,
            rows: Vec::new(),
        }
    }

    /// Adds a detector's row; `metrics` must have one entry per OOD set.
    pub fn push(&mut self, detector: impl Into<String>, metrics: Vec<OodMetrics>) -> Result<()> {
        if metrics.len() != self.ood_sets.len() {
            return Err(EngineError::InvalidInput(format!(
                "{} metrics for {} OOD sets",
                metrics.len(),
                self.ood_sets.len()
            )));
        }
        self.rows.push(TableRow {
            detector: detector.into(),
            metrics,
        });
        Ok(())
    }

    /// Mean of each metric over the OOD sets (the paper's "Average" column).
    pub fn average(row: &TableRow) -> OodMetrics {
        let n = row.metrics.len().max(1) as f64;
        let mean = |f: fn(&OodMetrics) -> f64| row.metrics.iter().map(f).sum::<f64>() / n;
        OodMetrics {
            auroc: mean(|m| m.auroc),
            fpr_at_95: mean(|m| m.fpr_at_95),
            aupr_in: mean(|m| m.aupr_in),
            aupr_out: mean(|m| m.aupr_out),
        }
    }

    /// Each row's cells: the OOD sets, then the average.
    fn cells(&self) -> Vec<Vec<OodMetrics>> {
        self.rows
            .iter()
            .map(|r| {
                let mut c = r.metrics.clone();
                c.push(Self::average(r));
                c
            })
            .collect()
    }

    /// GitHub Markdown, two decimals of percent.
    pub fn to_markdown(&self) -> String {
        let cells = self.cells();
        let columns = self.ood_sets.len() + 1;
        let best = |col: usize, f: fn(&OodMetrics) -> f64, higher: bool| {
            let vals = cells.iter().map(|r| f(&r[col]));
            if higher {
                vals.fold(f64::NEG_INFINITY, f64::max)
            } else {
                vals.fold(f64::INFINITY, f64::min)
            }
        };
        let fmt = |v: f64, best: f64| {
            let s = format!("{:.2}", 100.0 * v);
            if format!("{:.2}", 100.0 * best) == s {
                format!("**{s}**")
            } else {
                s
            }
        };
        let mut out = String::from("| Method |");
        for name in self.ood_sets.iter().map(String::as_str).chain(["Average"]) {
            out += &format!(" {name} AUROC↑ / FPR@95↓ |");
        }
        out += &format!("\n|---|{}\n", "---|".repeat(columns));
        for (row, c) in self.rows.iter().zip(&cells) {
            out += &format!("| {} |", row.detector);
            for (col, m) in c.iter().enumerate() {
                let a = fmt(m.auroc, best(col, |m| m.auroc, true));
                let f = fmt(m.fpr_at_95, best(col, |m| m.fpr_at_95, false));
                out += &format!(" {a} / {f} |");
            }
            out.push('\n');
        }
        out
    }
}
