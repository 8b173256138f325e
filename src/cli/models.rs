//! `diffguard models`: which weight files a recipe needs, where the guard looks for them, what is
//! found (and, with `--verify`, whether it fits the architecture), and where to download each.
//! `diffguard models fetch` downloads the missing ones (cargo feature `fetch`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use diffguard_engine::models::catalog::{
    self, FileReport, MODELS_ENV, ModelFile, PartMismatch, SearchPaths, Status, Verification, Via,
};

use diffguard_engine::bundle::Manifest;

use crate::config::Config;

/// Arguments of `diffguard models`.
#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub action: Option<ModelsAction>,
    /// Catalog to list: gdm or ldm (the paper's recipes and their published checkpoints), or
    /// bundle (the project's own bundle folder, whatever recipe it runs; pixel-cfg is accepted
    /// for it). Default: all three.
    #[arg(long, env = "DIFFGUARD_RECIPE", global = true)]
    pub recipe: Option<String>,
    /// Models directory searched (and written by `fetch`); default $DIFFGUARD_MODELS, else
    /// ~/.cache/diffguard.
    #[arg(long, env = MODELS_ENV, global = true)]
    pub dir: Option<PathBuf>,
    /// Explicit file for a role, as ROLE=PATH (repeatable, or comma-separated in the variable);
    /// roles are the first column of the table. An explicit path is final: if it does not exist
    /// the file is reported missing.
    #[arg(
        long = "file",
        value_name = "ROLE=PATH",
        env = "DIFFGUARD_MODEL_FILES",
        value_delimiter = ',',
        global = true
    )]
    pub files: Vec<String>,
    /// The project's bundle folder listed by the bundle catalog (default: the one `diffguard
    /// serve` would load: `detector.settings.bundle` of the config, else $DIFFGUARD_BUNDLE, else
    /// the source tree's models/fashion-mnist-latent). Its `bundle.json` names the files.
    #[arg(long, env = "DIFFGUARD_BUNDLE", global = true)]
    pub bundle: Option<PathBuf>,
    /// Guard config file whose detector settings name the bundle (as for `diffguard serve`).
    #[arg(long, env = "DIFFGUARD_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Open every found file and compare its tensors with the architecture (reads the whole
    /// file; the full ImageNet checkpoints take a few GB of memory).
    #[arg(long, env = "DIFFGUARD_MODELS_VERIFY", global = true)]
    pub verify: bool,
    /// Print JSON instead of a table.
    #[arg(long, env = "DIFFGUARD_MODELS_JSON", global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ModelsAction {
    /// Download the missing files into the models directory (needs a build with
    /// `--features fetch`; without it, prints the URLs to download by hand).
    Fetch,
}

/// One recipe's report.
#[derive(Debug, serde::Serialize)]
pub struct RecipeReport {
    pub recipe: String,
    pub models_dir: Option<PathBuf>,
    pub hf_cache: Option<PathBuf>,
    pub files: Vec<FileReport>,
}

/// Runs `diffguard models [fetch]`. Blocking (file reads, downloads): call it off the async
/// runtime. Fails when a file is missing or unusable, so scripts can test the exit status.
pub fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    let recipes = recipes(args)?;
    if matches!(args.action, Some(ModelsAction::Fetch)) {
        for recipe in &recipes {
            let (files, paths) = plan(args, recipe)?;
            fetch(&files, &paths)?;
        }
    }
    let reports = recipes
        .iter()
        .map(|r| report(args, r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{}", table(r));
        }
    }
    let bad: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.files
                .iter()
                .filter(|f| !f.usable())
                .map(move |f| format!("{}:{} {}", r.recipe, f.role, f.status.as_str()))
        })
        .collect();
    if !bad.is_empty() {
        bail!("not ready: {}", bad.join(", "));
    }
    Ok(())
}

fn recipes(args: &ModelsArgs) -> anyhow::Result<Vec<String>> {
    Ok(match &args.recipe {
        Some(r) => {
            catalog::catalog(r)?;
            vec![r.clone()]
        }
        None => catalog::RECIPES.iter().map(|r| r.to_string()).collect(),
    })
}

/// The catalog of `recipe` and the search order the arguments and environment give.
pub fn plan(args: &ModelsArgs, recipe: &str) -> anyhow::Result<(Vec<ModelFile>, SearchPaths)> {
    let bundle = match recipe {
        catalog::BUNDLE | "pixel-cfg" => Some(bundle_dir(args)?),
        _ => None,
    };
    // An unreadable manifest is reported as the `bundle` file's problem, not as a failure here.
    let manifest = bundle
        .as_deref()
        .and_then(|d| Some((d, Manifest::read(d).ok()?)));
    let files = match manifest {
        Some((dir, m)) => catalog::bundle_catalog(Some((dir, &m))),
        None => catalog::catalog(recipe)?,
    };
    let mut explicit = BTreeMap::new();
    for spec in &args.files {
        let (role, path) = spec
            .split_once('=')
            .with_context(|| format!("--file `{spec}`: expected ROLE=PATH"))?;
        if !files.iter().any(|f| f.role == role) && args.recipe.is_some() {
            let roles: Vec<&str> = files.iter().map(|f| f.role).collect();
            bail!(
                "--file `{spec}`: recipe {recipe} has no role `{role}` (roles: {})",
                roles.join(", ")
            );
        }
        explicit.insert(role.to_string(), PathBuf::from(path));
    }
    let bundle_dirs = bundle.into_iter().collect();
    let dir = args.dir.clone().map(OsString::from);
    let var = |k: &str| {
        if k == MODELS_ENV {
            dir.clone()
        } else {
            std::env::var_os(k)
        }
    };
    Ok((files, SearchPaths::from_env(explicit, bundle_dirs, var)))
}

/// The bundle folder exactly as the guard resolves it, unless `--bundle` names one.
fn bundle_dir(args: &ModelsArgs) -> anyhow::Result<PathBuf> {
    if let Some(b) = &args.bundle {
        return Ok(b.clone());
    }
    let cfg = Config::load(args.config.as_deref())?;
    Ok(crate::guard::diffguard::bundle_dir(&cfg.detector)?)
}

fn report(args: &ModelsArgs, recipe: &str) -> anyhow::Result<RecipeReport> {
    let (files, paths) = plan(args, recipe)?;
    Ok(RecipeReport {
        recipe: recipe.to_string(),
        models_dir: paths.models_dir().map(Path::to_path_buf),
        hf_cache: paths.hf_cache.clone(),
        files: catalog::check(&files, &paths, args.verify),
    })
}

/// The human-readable table of one recipe.
pub fn table(r: &RecipeReport) -> String {
    let show = |p: &Option<PathBuf>| p.as_ref().map_or("-".into(), |p| p.display().to_string());
    let mut out = format!(
        "recipe {}  (models dir: {}; Hugging Face cache: {})\n",
        r.recipe,
        show(&r.models_dir),
        show(&r.hf_cache)
    );
    let header = ["ROLE", "FILE", "STATUS", "PATH", "DOWNLOAD"].map(String::from);
    let rows: Vec<[String; 5]> = r.files.iter().map(row).collect();
    let widths: Vec<usize> = (0..4)
        .map(|i| {
            rows.iter()
                .chain([&header])
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (i, row) in [&header].into_iter().chain(&rows).enumerate() {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(&line);
        out.push_str(&row[4]);
        out.push('\n');
        if i > 0 {
            out.push_str(&details(&r.files[i - 1]));
        }
    }
    out.push('\n');
    out
}

fn row(f: &FileReport) -> [String; 5] {
    let path = match (&f.path, &f.via) {
        (Some(p), Some(Via::HuggingFace { repo })) => format!("{} (HF {repo})", p.display()),
        (Some(p), Some(Via::Explicit)) => format!("{} (explicit)", p.display()),
        (Some(p), _) => p.display().to_string(),
        (None, _) => "-".into(),
    };
    let download = f.sources.first().map(|s| s.describe()).unwrap_or_default();
    [
        f.role.clone(),
        f.names.first().cloned().unwrap_or_default(),
        f.status.as_str().into(),
        path,
        download,
    ]
}

/// Indented lines under a row: other sources, where a missing file was looked for, mismatches.
fn details(f: &FileReport) -> String {
    let mut out = String::new();
    for s in f.sources.iter().skip(1) {
        let _ = writeln!(out, "    also: {}", s.describe());
    }
    if f.status == Status::Missing {
        let _ = writeln!(out, "    looked in: {}", looked_in(&f.tried));
    }
    match &f.verification {
        Some(Verification::Mismatch { parts }) => {
            for p in parts {
                let _ = writeln!(out, "    {}: {}", part_label(p), short(p));
            }
        }
        Some(Verification::Unreadable { error }) => {
            let _ = writeln!(out, "    {error}");
        }
        _ => {}
    }
    out
}

fn part_label(p: &PartMismatch) -> String {
    if p.prefix.is_empty() {
        p.part.clone()
    } else {
        format!("{} (under `{}`)", p.part, p.prefix)
    }
}

/// Names listed per kind in the table; `--json` has them all.
const SHOWN: usize = 4;

fn short(p: &PartMismatch) -> String {
    fn list<T>(title: &str, items: &[T], show: impl Fn(&T) -> String) -> Option<String> {
        if items.is_empty() {
            return None;
        }
        let mut names: Vec<String> = items.iter().take(SHOWN).map(show).collect();
        if items.len() > SHOWN {
            names.push(format!("… {} more", items.len() - SHOWN));
        }
        Some(format!("{} {title} ({})", items.len(), names.join(", ")))
    }
    [
        list("missing", &p.missing, String::clone),
        list("wrong shape", &p.wrong_shape, |w| {
            format!("{} model {:?} vs file {:?}", w.name, w.model, w.checkpoint)
        }),
        list("unexpected", &p.unexpected, String::clone),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("; ")
}

/// The distinct directories of the tried paths, in order (the full list is in `--json`).
fn looked_in(tried: &[PathBuf]) -> String {
    let mut dirs: Vec<String> = Vec::new();
    for p in tried {
        let d = p.parent().unwrap_or(p).display().to_string();
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs.join(", ")
}

#[cfg(not(feature = "fetch"))]
fn fetch(files: &[ModelFile], paths: &SearchPaths) -> anyhow::Result<()> {
    let missing: Vec<&ModelFile> = files
        .iter()
        .filter(|f| catalog::locate(f, paths).found.is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let dir = paths
        .models_dir()
        .map_or("<models dir>".into(), |d| d.display().to_string());
    let mut msg = String::from(
        "this build cannot download: rebuild with `cargo build --release --features fetch`, \
         or download by hand:\n",
    );
    for f in missing {
        let url = f.sources.first().map(|s| s.describe()).unwrap_or_default();
        let name = f.names.first().map_or("", |n| n.as_ref());
        let _ = writeln!(msg, "  {url}\n    -> {dir}/{name}");
    }
    bail!("{}", msg.trim_end())
}

#[cfg(feature = "fetch")]
fn fetch(files: &[ModelFile], paths: &SearchPaths) -> anyhow::Result<()> {
    super::fetch::fetch_missing(files, paths)
}
