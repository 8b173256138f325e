//! diffusers `UNet2DModel` checkpoints run as the project's [`PixelUNet`], unchanged on disk: a
//! `save_pretrained` folder (`config.json` + `diffusion_pytorch_model.safetensors`) is read, its
//! configuration translated and its tensors renamed in memory.
//!
//! The pixel UNet is the ADM skeleton with scale-shift norm, resampling inside the ResBlocks,
//! legacy multi-head attention and a label table whose last row is the null label. diffusers
//! spells that family as: `resnet_time_scale_shift = "scale_shift"`; `ResnetDownsampleBlock2D` /
//! `ResnetUpsampleBlock2D`, or the attention blocks with `downsample_type` / `upsample_type =
//! "resnet"` (ResBlocks with `down` / `up`: 2×2 average pool and nearest ×2, as ADM's);
//! `attn_norm_num_groups = norm_num_groups` (under scale-shift diffusers otherwise builds the
//! middle attention without its GroupNorm, which ADM always has); `flip_sin_to_cos`, `freq_shift
//! = 0` (ADM's `[cos, sin]` embedding); `num_class_embeds = classes + 1`. Any other setting
//! computes something else, so it is refused with the key named rather than loaded approximately.
//! `scripts/golden_diffusers.py` writes the parity fixture the tests check against.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::layers::GN_EPS_ADM;
use super::load::{Checkpoint, LoadOptions};
use super::pixel_unet::{PixelUNet, PixelUNetConfig};
use crate::{EngineError, Result};

/// The configuration file of a diffusers model folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file of a diffusers model folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// The `UNet2DModel` keys that decide what the network computes, with diffusers' defaults for
/// keys an older `config.json` may lack. Other keys (`dropout`, `_diffusers_version`, ...) do not
/// change inference and are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    #[serde(default = "mid_block")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "conv")]
    pub downsample_type: String,
    #[serde(default = "conv")]
    pub upsample_type: String,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "eight")]
    pub attention_head_dim: Option<usize>,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub attn_norm_num_groups: Option<usize>,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "yes")]
    pub add_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
}

fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn one() -> f64 {
    1.0
}
fn eight() -> Option<usize> {
    Some(8)
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn positional() -> String {
    "positional".into()
}
fn conv() -> String {
    "conv".into()
}
fn silu() -> String {
    "silu".into()
}
fn default_shift() -> String {
    "default".into()
}
fn mid_block() -> Option<String> {
    Some("UNetMidBlock2D".into())
}

/// The pixel UNet's GroupNorm is ADM's GroupNorm32.
const GROUPS: usize = 32;

impl UNet2DConfig {
    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))
    }

    /// The pixel UNet this configuration is, or the first key that makes it something else.
    pub fn pixel_unet(&self) -> std::result::Result<PixelUNetConfig, String> {
        let need = |ok: bool, key: &str, got: String, want: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("`{key}` is {got}; the pixel UNet needs {want}"))
            }
        };
        let text = |s: &str| format!("{s:?}");
        if let Some(c) = &self.class_name {
            need(
                c == "UNet2DModel",
                "_class_name",
                text(c),
                "\"UNet2DModel\"",
            )?;
        }
        need(
            self.time_embedding_type == "positional",
            "time_embedding_type",
            text(&self.time_embedding_type),
            "\"positional\"",
        )?;
        need(
            self.flip_sin_to_cos,
            "flip_sin_to_cos",
            "false".into(),
            "true (ADM's [cos, sin] order)",
        )?;
        need(
            self.freq_shift == 0.0,
            "freq_shift",
            self.freq_shift.to_string(),
            "0",
        )?;
        need(
            !self.center_input_sample,
            "center_input_sample",
            "true".into(),
            "false",
        )?;
        need(
            self.act_fn == "silu",
            "act_fn",
            text(&self.act_fn),
            "\"silu\"",
        )?;
        need(
            self.resnet_time_scale_shift == "scale_shift",
            "resnet_time_scale_shift",
            text(&self.resnet_time_scale_shift),
            "\"scale_shift\"",
        )?;
        need(
            self.norm_num_groups == GROUPS,
            "norm_num_groups",
            self.norm_num_groups.to_string(),
            "32",
        )?;
        need(
            self.attn_norm_num_groups == Some(GROUPS),
            "attn_norm_num_groups",
            format!("{:?}", self.attn_norm_num_groups),
            "32 (without it the middle attention has no GroupNorm under scale-shift)",
        )?;
        need(
            (self.norm_eps - GN_EPS_ADM).abs() < 1e-12,
            "norm_eps",
            self.norm_eps.to_string(),
            "1e-5",
        )?;
        need(
            self.mid_block_type.as_deref() == Some("UNetMidBlock2D") && self.add_attention,
            "mid_block_type / add_attention",
            format!("{:?} / {}", self.mid_block_type, self.add_attention),
            "\"UNetMidBlock2D\" with attention",
        )?;
        need(
            self.mid_block_scale_factor == 1.0,
            "mid_block_scale_factor",
            self.mid_block_scale_factor.to_string(),
            "1",
        )?;
        need(
            self.in_channels == self.out_channels,
            "out_channels",
            self.out_channels.to_string(),
            "in_channels (ε has the input's shape)",
        )?;
        need(
            self.class_embed_type.is_none(),
            "class_embed_type",
            format!("{:?}", self.class_embed_type),
            "null (a label table)",
        )?;
        let rows = self.num_class_embeds.unwrap_or(0);
        need(
            rows >= 2,
            "num_class_embeds",
            format!("{:?}", self.num_class_embeds),
            "classes + 1 (the last row is the null label)",
        )?;
        let (model_channels, channel_mult) = self.channels()?;
        need(
            self.time_embedding_dim
                .is_none_or(|d| d == 4 * model_channels),
            "time_embedding_dim",
            format!("{:?}", self.time_embedding_dim),
            "4 × block_out_channels[0]",
        )?;
        need(
            self.layers_per_block >= 1,
            "layers_per_block",
            self.layers_per_block.to_string(),
            "at least 1",
        )?;
        let attention = self.attention_levels()?;
        let head = self.attention_head_dim.unwrap_or(0);
        let attended = attention
            .iter()
            .map(|&l| self.block_out_channels[l])
            .chain(self.block_out_channels.last().copied());
        for ch in attended {
            need(
                head > 0 && ch % head == 0,
                "attention_head_dim",
                format!("{:?}", self.attention_head_dim),
                &format!("a divisor of every attended width ({ch})"),
            )?;
        }
        Ok(PixelUNetConfig {
            image_size: self.image_size()?,
            in_channels: self.in_channels,
            model_channels,
            channel_mult,
            num_res_blocks: self.layers_per_block,
            attention_ds: attention.iter().map(|&l| 1 << l).collect(),
            num_head_channels: head,
            num_classes: rows - 1,
        })
    }

    fn channels(&self) -> std::result::Result<(usize, Vec<usize>), String> {
        let base = self.block_out_channels.first().copied().unwrap_or(0);
        let ok = base > 0
            && self
                .block_out_channels
                .iter()
                .all(|c| c % base == 0 && c % GROUPS == 0);
        if !ok {
            return Err(format!(
                "`block_out_channels` is {:?}; the pixel UNet needs multiples of the first width, \
                 each a multiple of 32",
                self.block_out_channels
            ));
        }
        let mult = self.block_out_channels.iter().map(|c| c / base).collect();
        Ok((base, mult))
    }

    fn image_size(&self) -> std::result::Result<usize, String> {
        let side = match &self.sample_size {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::Array(a)) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
            _ => None,
        };
        side.map(|s| s as usize).ok_or_else(|| {
            format!(
                "`sample_size` is {:?}; the pixel UNet needs one square side",
                self.sample_size
            )
        })
    }

    /// The levels with attention, checked to agree between the down and up paths and to resample
    /// inside ResBlocks wherever they resample.
    fn attention_levels(&self) -> std::result::Result<Vec<usize>, String> {
        let levels = self.block_out_channels.len();
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return Err(format!(
                "`down_block_types` / `up_block_types` have {} / {} entries for {levels} widths",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let mut attention = Vec::new();
        for level in 0..levels {
            let resamples = level + 1 < levels;
            let down = block_kind(
                "down_block_types",
                &self.down_block_types[level],
                ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                resamples,
                ("downsample_type", &self.downsample_type),
            )?;
            let up_index = levels - 1 - level;
            let up = block_kind(
                "up_block_types",
                &self.up_block_types[up_index],
                ["ResnetUpsampleBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                level > 0,
                ("upsample_type", &self.upsample_type),
            )?;
            if down != up {
                return Err(format!(
                    "`down_block_types[{level}]` and `up_block_types[{up_index}]` disagree on \
                     attention; the pixel UNet attends at the same levels both ways"
                ));
            }
            if down {
                attention.push(level);
            }
        }
        Ok(attention)
    }
}

/// Whether a block attends; an error when it would resample other than inside a ResBlock.
/// `kinds` = [resnet-resampling, attention, plain]; the plain block resamples with a strided or
/// padded convolution, so it is accepted only where nothing is resampled.
fn block_kind(
    key: &str,
    kind: &str,
    kinds: [&str; 3],
    resamples: bool,
    (type_key, resample_type): (&str, &str),
) -> std::result::Result<bool, String> {
    let [resnet, attn, plain] = kinds;
    match kind {
        k if k == resnet => Ok(false),
        k if k == plain && !resamples => Ok(false),
        k if k == attn && (!resamples || resample_type == "resnet") => Ok(true),
        k if k == attn => Err(format!(
            "`{type_key}` is {resample_type:?}; the pixel UNet resamples inside ResBlocks \
             (\"resnet\")"
        )),
        other => Err(format!(
            "`{key}` has {other:?}; the pixel UNet needs {resnet:?} or {attn:?} ({plain:?} only \
             where nothing is resampled)"
        )),
    }
}

/// One diffusers module and the ADM module it becomes.
enum Rename {
    /// Same tensors (`weight`, `bias`) under another name.
    Plain,
    /// A ResBlock (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`).
    ResBlock,
    /// An attention block: `to_q` / `to_k` / `to_v` merged into ADM's head-interleaved `qkv`.
    Attention { heads: usize },
}

/// The module correspondence of `cfg`, walking the blocks in ADM's construction order.
fn modules(cfg: &PixelUNetConfig) -> Vec<(String, String, Rename)> {
    use Rename::*;
    let levels = cfg.channel_mult.len();
    let attends = |level: usize| cfg.attention_ds.contains(&(1 << level));
    let heads =
        |level: usize| cfg.model_channels * cfg.channel_mult[level] / cfg.num_head_channels.max(1);
    let mut m: Vec<(String, String, Rename)> = vec![
        (
            "time_embed.0".into(),
            "time_embedding.linear_1".into(),
            Plain,
        ),
        (
            "time_embed.2".into(),
            "time_embedding.linear_2".into(),
            Plain,
        ),
        ("label_emb".into(), "class_embedding".into(), Plain),
        ("input_blocks.0.0".into(), "conv_in".into(), Plain),
    ];
    let mut block = 1;
    for level in 0..levels {
        let down = format!("down_blocks.{level}");
        for i in 0..cfg.num_res_blocks {
            m.push((
                format!("input_blocks.{block}.0"),
                format!("{down}.resnets.{i}"),
                ResBlock,
            ));
            if attends(level) {
                let heads = heads(level);
                m.push((
                    format!("input_blocks.{block}.1"),
                    format!("{down}.attentions.{i}"),
                    Attention { heads },
                ));
            }
            block += 1;
        }
        if level + 1 < levels {
            m.push((
                format!("input_blocks.{block}.0"),
                format!("{down}.downsamplers.0"),
                ResBlock,
            ));
            block += 1;
        }
    }
    let top = levels - 1;
    m.push((
        "middle_block.0".into(),
        "mid_block.resnets.0".into(),
        ResBlock,
    ));
    m.push((
        "middle_block.1".into(),
        "mid_block.attentions.0".into(),
        Attention { heads: heads(top) },
    ));
    m.push((
        "middle_block.2".into(),
        "mid_block.resnets.1".into(),
        ResBlock,
    ));
    let mut block = 0;
    for (j, level) in (0..levels).rev().enumerate() {
        let up = format!("up_blocks.{j}");
        for i in 0..=cfg.num_res_blocks {
            let out = format!("output_blocks.{block}");
            m.push((format!("{out}.0"), format!("{up}.resnets.{i}"), ResBlock));
            let mut layer = 1;
            if attends(level) {
                let heads = heads(level);
                m.push((
                    format!("{out}.1"),
                    format!("{up}.attentions.{i}"),
                    Attention { heads },
                ));
                layer = 2;
            }
            if level > 0 && i == cfg.num_res_blocks {
                m.push((
                    format!("{out}.{layer}"),
                    format!("{up}.upsamplers.0"),
                    ResBlock,
                ));
            }
            block += 1;
        }
    }
    m.push(("out.0".into(), "conv_norm_out".into(), Plain));
    m.push(("out.2".into(), "conv_out".into(), Plain));
    m
}

const RESBLOCK: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Renames diffusers tensors to the pixel UNet's (ADM) names. Tensors it has no rule for keep
/// their names, so loading reports them as unexpected; a rule whose source is absent leaves the
/// ADM tensor missing, reported the same way.
pub fn to_adm(
    mut tensors: HashMap<String, Tensor>,
    cfg: &PixelUNetConfig,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    let mut plain = |adm: &str, dif: &str, src: &mut HashMap<String, Tensor>| {
        for suffix in ["weight", "bias"] {
            if let Some(t) = src.remove(&format!("{dif}.{suffix}")) {
                out.insert(format!("{adm}.{suffix}"), t);
            }
        }
    };
    let mut merged = Vec::new();
    for (adm, dif, rename) in modules(cfg) {
        match rename {
            Rename::Plain => plain(&adm, &dif, &mut tensors),
            Rename::ResBlock => {
                for (a, d) in RESBLOCK {
                    plain(&format!("{adm}.{a}"), &format!("{dif}.{d}"), &mut tensors);
                }
            }
            Rename::Attention { heads } => {
                plain(
                    &format!("{adm}.norm"),
                    &format!("{dif}.group_norm"),
                    &mut tensors,
                );
                plain(
                    &format!("{adm}.proj_out"),
                    &format!("{dif}.to_out.0"),
                    &mut tensors,
                );
                merged.push((adm, dif, heads));
            }
        }
    }
    for (adm, dif, heads) in merged {
        merge_qkv(&mut out, &mut tensors, &adm, &dif, heads)?;
        // ADM's projections are 1×1 conv1d weights (C, C, 1).
        let proj = format!("{adm}.proj_out.weight");
        if let Some(w) = out.remove(&proj) {
            out.insert(proj, w.unsqueeze(2)?);
        }
    }
    out.extend(tensors);
    Ok(out)
}

/// ADM's legacy attention splits `qkv` per head into [q_h; k_h; v_h] row blocks; diffusers keeps
/// three projections of all heads each. Leaves everything in place unless all six are present.
fn merge_qkv(
    out: &mut HashMap<String, Tensor>,
    src: &mut HashMap<String, Tensor>,
    adm: &str,
    dif: &str,
    heads: usize,
) -> Result<()> {
    for suffix in ["weight", "bias"] {
        let names = ["to_q", "to_k", "to_v"].map(|p| format!("{dif}.{p}.{suffix}"));
        if names.iter().any(|n| !src.contains_key(n)) {
            return Ok(());
        }
        let [q, k, v] = names.map(|n| src.remove(&n).expect("checked above"));
        let rows = q.dim(0)?;
        let d = rows / heads.max(1);
        if heads == 0 || d * heads != rows {
            return Err(EngineError::Config(format!(
                "{dif}: {rows} projection rows do not split into {heads} heads"
            )));
        }
        let mut parts = Vec::with_capacity(3 * heads);
        for h in 0..heads {
            for t in [&q, &k, &v] {
                parts.push(t.narrow(0, h * d, d)?);
            }
        }
        let qkv = Tensor::cat(&parts, 0)?;
        let qkv = if suffix == "weight" {
            qkv.unsqueeze(2)?
        } else {
            qkv
        };
        out.insert(format!("{adm}.qkv.{suffix}"), qkv);
    }
    Ok(())
}

/// Whether `path` is a diffusers model folder.
pub fn is_model_folder(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).is_file()
}

/// Loads a diffusers `UNet2DModel` folder as a pixel UNet. A configuration outside the pixel
/// UNet's family is an error naming the key; missing, unexpected or wrongly shaped tensors are
/// listed by name (ADM names for what the network needed, diffusers names for what was left).
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<PixelUNet> {
    load_config(dir, config_of(dir)?, dtype, device)
}

/// [`load`] for a bundle that declares the architecture: the folder's `config.json` must
/// translate to exactly `declared`, checked before any tensor is read.
pub fn load_declared(
    dir: &Path,
    declared: &PixelUNetConfig,
    dtype: DType,
    device: &Device,
) -> Result<PixelUNet> {
    let config = config_of(dir)?;
    if &config != declared {
        return Err(EngineError::Config(format!(
            "denoiser.pixel_unet is {declared:?} but the diffusers folder {} holds {config:?}",
            dir.display()
        )));
    }
    load_config(dir, config, dtype, device)
}

/// The pixel UNet `dir/config.json` describes, or an error naming the key that rules it out.
fn config_of(dir: &Path) -> Result<PixelUNetConfig> {
    UNet2DConfig::read(dir)?
        .pixel_unet()
        .map_err(|e| EngineError::Config(format!("{}: {e}", dir.join(CONFIG_FILE).display())))
}

fn load_config(
    dir: &Path,
    config: PixelUNetConfig,
    dtype: DType,
    device: &Device,
) -> Result<PixelUNet> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(EngineError::Io {
            path: weights.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no weights file"),
        });
    }
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let renamed = to_adm(tensors, &config)?;
    Checkpoint::from_tensors(&weights, renamed).load(&LoadOptions::new(dtype, device), |vb| {
        PixelUNet::new(vb, config.clone())
    })
}
