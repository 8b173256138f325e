//! The evaluation's output folder: `results.json`, `results.md` (the paper's table layout plus a
//! speed table), `roc.png` (one panel per OOD set) and `report.html`, self-contained (images
//! inlined as base64 PNG) with the tables, the ROC panels and, per set, a gallery of input /
//! synthesis / |difference| for the most and least in-distribution images (the paper's Fig. 3).

use std::fmt::Write as _;
use std::path::Path;

use candle_core::{DType, Tensor};
use image::{ImageBuffer, Rgb, RgbImage};

use super::run::{DetectorKind, DetectorResult, EvalResults, GalleryItem};
use crate::{EngineError, Result};

/// Side of one ROC panel, pixels.
const PANEL: u32 = 360;
/// Gallery thumbnails are upscaled by this factor (28 px → 84 px).
const THUMB_SCALE: u32 = 3;
/// The report's HTML marks each gallery image with this class; tests count them.
pub const GALLERY_IMG_CLASS: &str = "gallery-img";

/// Distinct, colour-blind-friendly-ish line colours (Tableau 10 + two more).
const PALETTE: [[u8; 3]; 12] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [0, 0, 0],
    [255, 200, 0],
];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |source| EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes every output file into `out` (created if needed).
pub fn write_outputs(results: &EvalResults, out: &Path, command: &str) -> Result<()> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let json = serde_json::to_string_pretty(results)
        .map_err(|e| EngineError::Config(format!("results.json: {e}")))?;
    write(&out.join("results.json"), json + "\n")?;
    write(&out.join("results.md"), markdown(results, command)?)?;
    let roc = png_bytes(&roc_image(results))?;
    write_bytes(&out.join("roc.png"), &roc)?;
    write(&out.join("report.html"), html(results, &roc, command)?)
}

fn write(path: &Path, text: String) -> Result<()> {
    write_bytes(path, text.as_bytes())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(io(path))
}

/// The rows that get an ROC curve: everything but the oracles (their envelope is not a detector).
fn plotted(results: &EvalResults) -> impl Iterator<Item = &DetectorResult> {
    results
        .detectors
        .iter()
        .filter(|d| d.kind != DetectorKind::Oracle)
}

fn color(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

/// The results as Markdown: the paper-layout table, then speed.
pub fn markdown(results: &EvalResults, command: &str) -> Result<String> {
    let mut s = format!(
        "# DiffGuard evaluation: {}\n\nIn-distribution: {} ({} images); OOD: {}. Seed {}, \
         KNN/ViM bank {} training images, cascade thresholds from {} validation images.\n\n\
         Command: `{command}`\n\nAUROC↑ / FPR@95↓ in percent. Rows marked *envelope oracle* pick \
         thresholds on the test labels (spec §8.4): they measure complementarity, not a \
         deployable detector.\n\n",
        results.bundle,
        results.ind_set,
        results
            .set_sizes
            .get(&results.ind_set)
            .copied()
            .unwrap_or(0),
        results
            .ood_sets
            .iter()
            .map(|s| format!("{s} ({})", results.set_sizes.get(s).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
        results.seed,
        results.bank_images,
        results.validation_images,
    );
    s += &results.table()?.to_markdown();
    s += "\n| Method | kind | images/s | network evals / image | avg AUPR-In | avg AUPR-Out |\n|---|---|---|---|---|---|\n";
    for d in &results.detectors {
        let _ = writeln!(
            s,
            "| {} | {:?} | {} | {:.1} | {} | {} |",
            d.name,
            d.kind,
            num(d.images_per_second, 1),
            d.nfe_per_image,
            pct(d.average.aupr_in),
            pct(d.average.aupr_out),
        );
    }
    let _ = writeln!(
        s,
        "\nDiffGuard images computed this run: {}, reused from the cache: {}.",
        results.cache.computed, results.cache.cached
    );
    Ok(s)
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

fn pct(v: f64) -> String {
    num(100.0 * v, 2)
}

/// One ROC panel per OOD set, side by side, each with the diagonal and a curve per detector.
pub fn roc_image(results: &EvalResults) -> RgbImage {
    let panels = results.ood_sets.len().max(1) as u32;
    let margin = 12;
    let mut img = ImageBuffer::from_pixel(
        panels * (PANEL + margin) + margin,
        PANEL + 2 * margin,
        Rgb([255, 255, 255]),
    );
    for p in 0..panels {
        let x0 = margin + p * (PANEL + margin);
        let map = |fpr: f64, tpr: f64| {
            let x = x0 as f64 + fpr.clamp(0.0, 1.0) * (PANEL - 1) as f64;
            let y = (margin + PANEL - 1) as f64 - tpr.clamp(0.0, 1.0) * (PANEL - 1) as f64;
            (x, y)
        };
        let grey = [200, 200, 200];
        for (a, b) in [
            ((0.0, 0.0), (1.0, 0.0)),
            ((0.0, 0.0), (0.0, 1.0)),
            ((1.0, 0.0), (1.0, 1.0)),
            ((0.0, 1.0), (1.0, 1.0)),
            ((0.0, 0.0), (1.0, 1.0)),
        ] {
            line(&mut img, map(a.0, a.1), map(b.0, b.1), grey);
        }
        for (i, d) in plotted(results).enumerate() {
            if let Some((fpr, tpr)) = d.curves.get(p as usize) {
                for k in 1..fpr.len().min(tpr.len()) {
                    line(
                        &mut img,
                        map(fpr[k - 1], tpr[k - 1]),
                        map(fpr[k], tpr[k]),
                        color(i),
                    );
                }
            }
        }
    }
    img
}

/// A 2-pixel-wide line by dense sampling (curves have at most a few thousand segments).
fn line(img: &mut RgbImage, (xa, ya): (f64, f64), (xb, yb): (f64, f64), c: [u8; 3]) {
    let steps = ((xb - xa).abs().max((yb - ya).abs()).ceil() as usize).max(1) * 2;
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (xa + t * (xb - xa), ya + t * (yb - ya));
        for (dx, dy) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)] {
            let (px, py) = ((x + dx - 0.5).round(), (y + dy - 0.5).round());
            if px >= 0.0 && py >= 0.0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgb(c));
            }
        }
    }
}

fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| EngineError::InvalidInput(format!("PNG encoding: {e}")))?;
    Ok(out.into_inner())
}

/// (C, H, W) values in [0, 1] → an upscaled RGB thumbnail.
fn thumbnail(t01: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t01.dims3()?;
    let v = t01.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let byte = |ch: usize, y: usize, x: usize| {
        (v[(ch * h + y) * w + x].clamp(0.0, 1.0) * 255.0).round() as u8
    };
    let s = THUMB_SCALE;
    Ok(ImageBuffer::from_fn(w as u32 * s, h as u32 * s, |x, y| {
        let (x, y) = ((x / s) as usize, (y / s) as usize);
        let px = |ch: usize| byte(if c == 3 { ch } else { 0 }, y, x);
        Rgb([px(0), px(1), px(2)])
    }))
}

/// The three gallery images of one item: input, synthesis, |synthesis − reference|.
/// The difference is shown on a fixed scale (|Δ|/2 of [-1,1] data) so images compare honestly.
fn gallery_pngs(item: &GalleryItem) -> Result<[Vec<u8>; 3]> {
    let unit = |t: &Tensor| -> Result<Tensor> { Ok(((t.to_dtype(DType::F32)? + 1.0)? / 2.0)?) };
    let diff =
        (item.synthesis.to_dtype(DType::F32)? - item.reference.to_dtype(DType::F32)?)?.abs()? / 2.0;
    Ok([
        png_bytes(&thumbnail(&unit(&item.input)?)?)?,
        png_bytes(&thumbnail(&unit(&item.synthesis)?)?)?,
        png_bytes(&thumbnail(&diff?)?)?,
    ])
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Standard base64 (RFC 4648) with padding, for data URIs.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn img_tag(png: &[u8], class: &str, alt: &str) -> String {
    format!(
        "<img class=\"{class}\" alt=\"{}\" src=\"data:image/png;base64,{}\">",
        escape(alt),
        base64(png)
    )
}

/// The self-contained HTML report.
pub fn html(results: &EvalResults, roc_png: &[u8], command: &str) -> Result<String> {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>DiffGuard evaluation</title><style>\
         body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}\
         .oracle{color:#777;font-style:italic}.sw{display:inline-block;width:14px;height:14px;margin-right:6px}\
         .cell{display:inline-block;margin:6px;padding:4px;border:1px solid #ddd;font-size:12px}\
         .cell img{image-rendering:pixelated;margin-right:2px}</style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>DiffGuard evaluation: {}</h1><p>Bundle fingerprint <code>{}</code>. Command: <code>{}</code>.</p>",
        escape(&results.bundle),
        escape(&results.bundle_fingerprint),
        escape(command)
    );
    h += "<h2>Metrics</h2><p>AUROC↑ / FPR@95↓ in percent, InD = positive. Oracle rows pick \
          thresholds on the test labels (evaluation only).</p><table><tr><th>Method</th>";
    for s in results
        .ood_sets
        .iter()
        .map(String::as_str)
        .chain(["Average"])
    {
        let _ = write!(h, "<th>{}</th>", escape(s));
    }
    h += "<th>images/s</th><th>NFE/image</th></tr>";
    let mut plotted_index = 0;
    for d in &results.detectors {
        let oracle = d.kind == DetectorKind::Oracle;
        let swatch = if oracle {
            String::new()
        } else {
            let [r, g, b] = color(plotted_index);
            plotted_index += 1;
            format!("<span class=\"sw\" style=\"background:rgb({r},{g},{b})\"></span>")
        };
        let _ = write!(
            h,
            "<tr{}><td>{swatch}{}</td>",
            if oracle { " class=\"oracle\"" } else { "" },
            escape(&d.name)
        );
        for m in d.metrics.iter().chain([&d.average]) {
            let _ = write!(h, "<td>{} / {}</td>", pct(m.auroc), pct(m.fpr_at_95));
        }
        let _ = write!(
            h,
            "<td>{}</td><td>{:.1}</td></tr>",
            num(d.images_per_second, 1),
            d.nfe_per_image
        );
    }
    h += "</table><h2>ROC curves</h2><p>One panel per OOD set (";
    h += &escape(&results.ood_sets.join(", "));
    h += "); colours as in the table.</p>";
    h += &img_tag(roc_png, "roc", "ROC curves");
    h += &gallery_html(results)?;
    h += "</body></html>\n";
    Ok(h)
}

fn gallery_html(results: &EvalResults) -> Result<String> {
    let count = results.gallery.len() * 3;
    let mut h = format!(
        "<h2>Gallery</h2><p>Per set, the images DiffGuard scored most and least in-distribution: \
         input, synthesis, |synthesis − reference| (fixed scale). \
         <span id=\"gallery-count\" data-count=\"{count}\">{count}</span> gallery images.</p>"
    );
    let sets = std::iter::once(&results.ind_set).chain(&results.ood_sets);
    for set in sets {
        let items: Vec<&GalleryItem> = results.gallery.iter().filter(|g| &g.set == set).collect();
        if items.is_empty() {
            continue;
        }
        let _ = write!(h, "<h3>{}</h3>", escape(set));
        for (title, top) in [
            ("most in-distribution", true),
            ("least in-distribution", false),
        ] {
            let _ = write!(h, "<h4>{title}</h4><div>");
            for item in items.iter().filter(|g| g.top == top) {
                let [input, synth, diff] = gallery_pngs(item)?;
                let alt = format!("{} #{}", item.set, item.index);
                let _ = write!(
                    h,
                    "<div class=\"cell\">{}{}{}<br>#{} → {} · score {:.4}</div>",
                    img_tag(&input, GALLERY_IMG_CLASS, &format!("{alt} input")),
                    img_tag(&synth, GALLERY_IMG_CLASS, &format!("{alt} synthesis")),
                    img_tag(&diff, GALLERY_IMG_CLASS, &format!("{alt} difference")),
                    item.index,
                    escape(&item.label),
                    item.score
                );
            }
            h += "</div>";
        }
    }
    Ok(h)
}
