//! Per-image DiffGuard scores on disk, so an interrupted evaluation or calibration resumes where
//! it stopped. One JSON object per line, appended and flushed after every batch; the key is
//! (detector fingerprint, dataset name, index in that dataset), so a changed recipe or weight file
//! never reuses another detector's scores. A torn last line (a kill mid-write) is skipped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// One scored image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedScore {
    pub detector: String,
    pub dataset: String,
    pub index: usize,
    pub score: f64,
    /// The label the synthesis was guided towards (the classifier's prediction).
    pub label: u32,
    /// Network evaluations spent on the image, all networks together.
    pub nfe: usize,
    /// Denoiser evaluations alone.
    pub nfe_denoiser: usize,
    /// Wall-clock seconds of the image's share of its batch.
    pub seconds: f64,
}

type Key = (String, String, usize);

/// The loaded cache plus an append handle.
pub struct ScoreCache {
    path: PathBuf,
    entries: HashMap<Key, CachedScore>,
    file: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ScoreCache {
    /// Opens (creating if needed) the cache file and reads every complete line.
    pub fn open(path: &Path) -> Result<Self> {
        let mut entries = HashMap::new();
        if path.exists() {
            let reader = BufReader::new(File::open(path).map_err(io(path))?);
            for line in reader.lines() {
                let line = line.map_err(io(path))?;
                if let Ok(e) = serde_json::from_str::<CachedScore>(&line) {
                    entries.insert((e.detector.clone(), e.dataset.clone(), e.index), e);
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            entries,
            file,
        })
    }

    pub fn get(&self, detector: &str, dataset: &str, index: usize) -> Option<&CachedScore> {
        self.entries
            .get(&(detector.to_string(), dataset.to_string(), index))
    }

    /// Appends a batch of scores and flushes, so a kill loses at most the batch in flight.
    pub fn insert(&mut self, batch: Vec<CachedScore>) -> Result<()> {
        let mut text = String::new();
        for e in &batch {
            let line = serde_json::to_string(e)
                .map_err(|err| EngineError::Config(format!("score cache entry: {err}")))?;
            // A line torn by an earlier kill must not swallow this one.
            text.push('\n');
            text += &line;
        }
        let path = self.path.clone();
        self.file.write_all(text.as_bytes()).map_err(io(&path))?;
        self.file.flush().map_err(io(&path))?;
        for e in batch {
            self.entries
                .insert((e.detector.clone(), e.dataset.clone(), e.index), e);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
