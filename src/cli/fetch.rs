//! `diffguard models fetch` (cargo feature `fetch`): downloads missing files over HTTPS into the
//! models directory. Hugging Face mirrors are fetched from their plain `resolve/main` URLs.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use diffguard_engine::models::catalog::{self, ModelFile, SearchPaths, Source};

/// Downloads every file of `files` that the lookup does not find, trying its sources in order.
pub fn fetch_missing(files: &[ModelFile], paths: &SearchPaths) -> anyhow::Result<()> {
    // reqwest is built without a bundled crypto provider; the guard already ships ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = paths
        .models_dir()
        .context("no models directory: set --dir or DIFFGUARD_MODELS")?;
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .context("HTTP client")?;
    for file in files {
        if catalog::locate(file, paths).found.is_some() {
            continue;
        }
        fetch_one(&client, file, dir)?;
    }
    Ok(())
}

fn fetch_one(
    client: &reqwest::blocking::Client,
    file: &ModelFile,
    dir: &Path,
) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for source in &file.sources {
        let result = match source {
            Source::Url { url } => target(file, dir, false)
                .and_then(|dest| download(client, url, &dest).map(|()| dest)),
            Source::ZipMember { url, member } => target(file, dir, false).and_then(|dest| {
                let zip = dest.with_extension("zip.part");
                download(client, url, &zip)?;
                let out = unzip_member(&zip, member, &dest);
                let _ = std::fs::remove_file(&zip);
                out.map(|()| dest)
            }),
            Source::HuggingFace {
                repo, file: name, ..
            } => {
                let url = format!("https://huggingface.co/{repo}/resolve/main/{name}");
                target(file, dir, true)
                    .and_then(|dest| download(client, &url, &dest).map(|()| dest))
            }
            Source::Project { how } => Err(anyhow::anyhow!("{how}")),
        };
        match result {
            Ok(dest) => {
                eprintln!("{}: saved {}", file.role, dest.display());
                return Ok(());
            }
            Err(e) => errors.push(format!("{}: {e:#}", source.describe())),
        }
    }
    bail!(
        "{}: no source worked:\n  {}",
        file.role,
        errors.join("\n  ")
    )
}

/// Where a download lands: the file's first name (its first `.safetensors` name for a
/// safetensors mirror, so the extension does not lie).
fn target(file: &ModelFile, dir: &Path, safetensors: bool) -> anyhow::Result<PathBuf> {
    let name = file
        .names
        .iter()
        .find(|n| !safetensors || n.ends_with(".safetensors"))
        .with_context(|| format!("{}: no file name for this source", file.role))?;
    let dest = dir.join(name.as_ref());
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    Ok(dest)
}

/// Streams `url` into `dest` through a `.part` file renamed at the end, so an interrupted
/// download never looks like a complete checkpoint.
fn download(client: &reqwest::blocking::Client, url: &str, dest: &Path) -> anyhow::Result<()> {
    eprintln!("downloading {url}");
    let mut resp = client.get(url).send()?.error_for_status()?;
    let part = dest.with_extension("part");
    let mut out = File::create(&part).with_context(|| part.display().to_string())?;
    io::copy(&mut resp, &mut out).with_context(|| format!("writing {}", part.display()))?;
    out.flush()?;
    std::fs::rename(&part, dest).with_context(|| dest.display().to_string())?;
    Ok(())
}

fn unzip_member(zip: &Path, member: &str, dest: &Path) -> anyhow::Result<()> {
    let mut archive = zip::ZipArchive::new(File::open(zip)?)?;
    let mut entry = archive
        .by_name(member)
        .with_context(|| format!("{} has no {member}", zip.display()))?;
    let part = dest.with_extension("part");
    let mut out = File::create(&part)?;
    io::copy(&mut entry, &mut out)?;
    std::fs::rename(&part, dest)?;
    Ok(())
}
