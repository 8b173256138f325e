//! ResNet classifiers with torchvision tensor names (`conv1`, `bn1`, `layer{i}.{j}.conv1`, …,
//! `downsample.{0,1}`, `fc`), so official torchvision / DiffGuard checkpoints load unchanged.
//!
//! Two shapes share one implementation: the torchvision ImageNet ResNet (7×7 stride-2 stem plus a
//! 3×3 stride-2 max pool, Bottleneck or BasicBlock) and a small ResNet for 28×28 / 32×32 inputs
//! (3×3 stride-1 stem, no pool). The input normalisation lives inside the model: callers pass
//! images in [0,1]. BatchNorm runs in eval mode except in [`ResNet::forward_t`] with `train`.

use std::path::Path;

use candle_core::{D, DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::model::{Classifier, ClassifierOutput, LabelId};
use crate::models::load::{Checkpoint, IGNORE_BN_COUNTERS, LoadOptions};
use crate::ops::conv::conv2d;
use crate::ops::pool::{MaxPool2d, global_avg_pool};
use crate::{EngineError, Result};

/// ImageNet statistics torchvision models are trained with.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34 and the small variant).
    Basic,
    /// 1×1 → 3×3 (strided, torchvision v1.5) → 1×1 with 4× expansion (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> usize {
        match self {
            Self::Basic => 1,
            Self::Bottleneck => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 7×7 stride-2 convolution + 3×3 stride-2 max pool (torchvision).
    ImageNet,
    /// 3×3 stride-1 convolution, no pool: keeps 28×28 / 32×32 inputs from collapsing.
    Small,
}

/// Architecture of a [`ResNet`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub block: BlockKind,
    pub stem: Stem,
    /// Output channels of `conv1`.
    pub stem_width: usize,
    /// Blocks per stage (`layer1`, `layer2`, …); e.g. [3, 4, 6, 3] for ResNet-50.
    pub layers: Vec<usize>,
    /// Base width (planes) per stage; a stage outputs `width · expansion` channels.
    pub widths: Vec<usize>,
    pub in_channels: usize,
    pub num_classes: usize,
    /// Per-channel input normalisation applied inside the model to the [0,1] input.
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub bn_eps: f64,
}

impl ResNetConfig {
    /// torchvision's ImageNet ResNet with the given block and depth (e.g. Bottleneck [3,4,6,3]).
    pub fn torchvision(block: BlockKind, layers: Vec<usize>, num_classes: usize) -> Self {
        Self {
            block,
            stem: Stem::ImageNet,
            stem_width: 64,
            widths: [64, 128, 256, 512].into_iter().take(layers.len()).collect(),
            layers,
            in_channels: 3,
            num_classes,
            mean: IMAGENET_MEAN.to_vec(),
            std: IMAGENET_STD.to_vec(),
            bn_eps: 1e-5,
        }
    }

    /// torchvision `resnet50` (1000 ImageNet classes for the official checkpoint).
    pub fn resnet50(num_classes: usize) -> Self {
        Self::torchvision(BlockKind::Bottleneck, vec![3, 4, 6, 3], num_classes)
    }

    /// The small BasicBlock ResNet for 28×28 / 32×32 images; stage `i > 0` halves the resolution.
    pub fn small(
        in_channels: usize,
        widths: Vec<usize>,
        layers: Vec<usize>,
        num_classes: usize,
        mean: Vec<f64>,
        std: Vec<f64>,
    ) -> Self {
        Self {
            block: BlockKind::Basic,
            stem: Stem::Small,
            stem_width: widths.first().copied().unwrap_or(16),
            layers,
            widths,
            in_channels,
            num_classes,
            mean,
            std,
            bn_eps: 1e-5,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(format!("ResNet: {m}")));
        if self.layers.is_empty() || self.layers.len() != self.widths.len() {
            return bad(format!(
                "need one width per stage, got layers {:?} and widths {:?}",
                self.layers, self.widths
            ));
        }
        if self.layers.contains(&0) || self.widths.contains(&0) || self.stem_width == 0 {
            return bad("stage depths and widths must be positive".into());
        }
        if self.mean.len() != self.in_channels || self.std.len() != self.in_channels {
            return bad(format!(
                "mean/std need {} values (one per input channel)",
                self.in_channels
            ));
        }
        if self.std.iter().any(|s| *s <= 0.0) || self.num_classes == 0 {
            return bad("std must be positive and num_classes ≥ 1".into());
        }
        Ok(())
    }

    /// Channels of the last stage (= penultimate feature size).
    pub fn feature_dim(&self) -> usize {
        self.widths.last().copied().unwrap_or(0) * self.block.expansion()
    }
}

/// A convolution through [`crate::ops::conv::conv2d`], whose CPU backward computes only the
/// gradients something tracks (for checkpoint weights: the input gradient alone).
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv {
    /// A bias-free conv with torchvision's names (torchvision convs feed a BatchNorm).
    fn load(
        vb: VarBuilder,
        io: (usize, usize),
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        // Kaiming init matters only for a fresh VarMap (training); checkpoints ignore hints.
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((io.1, io.0, k, k), "weight", init)?;
        Ok(Self {
            weight,
            bias: None,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )?)
    }
}

fn bn(vb: VarBuilder, c: usize, eps: f64) -> Result<BatchNorm> {
    let cfg = BatchNormConfig {
        eps,
        ..Default::default()
    };
    Ok(candle_nn::batch_norm(c, cfg, vb)?)
}

/// Conv → BN (→ ReLU) pair, the unit everything is made of.
#[derive(Debug, Clone)]
enum ConvBn {
    /// Trainable weights (a VarMap): conv + BatchNorm, kernel gradients kept.
    Trainable { conv: Conv, bn: BatchNorm },
    /// Constant weights (a checkpoint): the eval-mode BN folded into the conv, one op instead
    /// of five broadcast ops whose backward reduces gradients for BN statistics nobody needs.
    Folded(Conv),
}

impl ConvBn {
    fn new(
        vb: &VarBuilder,
        n: usize,
        io: (usize, usize),
        k: usize,
        stride: usize,
        eps: f64,
    ) -> Result<Self> {
        let conv = Conv::load(vb.pp(format!("conv{n}")), io, k, stride, k / 2)?;
        let bn = bn(vb.pp(format!("bn{n}")), io.1, eps)?;
        Self::assemble(conv, bn)
    }

    fn assemble(conv: Conv, bn: BatchNorm) -> Result<Self> {
        // Weights from a VarMap are Vars; checkpoint weights are plain tensors. The BN
        // statistics cannot tell: candle wraps them in Vars either way.
        Ok(if conv.weight.is_variable() {
            Self::Trainable { conv, bn }
        } else {
            Self::Folded(fold_bn(&conv, &bn)?)
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match (self, train) {
            (Self::Folded(folded), false) => folded.forward(x),
            (Self::Folded(_), true) => Err(EngineError::Config(
                "training mode needs a ResNet built from a VarMap; this one has constant weights"
                    .into(),
            )),
            (Self::Trainable { conv, bn }, _) => Ok(bn.forward_t(&conv.forward(x)?, train)?),
        }
    }
}

/// conv(x; W)·s + t = conv(x; W·s) + t with s = γ/√(σ² + ε), t = β − μ·s; computed in f64.
fn fold_bn(conv: &Conv, bn: &BatchNorm) -> Result<Conv> {
    let dtype = conv.weight.dtype();
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64);
    let (mean, var) = (f64_of(bn.running_mean())?, f64_of(bn.running_var())?);
    let inv_std = (var + bn.eps())?.sqrt()?.recip()?;
    let (scale, shift) = match bn.weight_and_bias() {
        Some((g, b)) => {
            let scale = (f64_of(g)? * inv_std)?;
            let shift = (f64_of(b)? - (&mean * &scale)?)?;
            (scale, shift)
        }
        None => (inv_std.clone(), (mean.neg()? * inv_std)?),
    };
    let weight = f64_of(&conv.weight)?.broadcast_mul(&scale.reshape(((), 1, 1, 1))?)?;
    // Detached: candle keeps BN statistics in Vars, which would make the folded weights look
    // tracked and cost a weight gradient in every backward pass.
    Ok(Conv {
        weight: weight.to_dtype(dtype)?.detach(),
        bias: Some(shift.to_dtype(dtype)?.detach()),
        stride: conv.stride,
        padding: conv.padding,
    })
}

#[derive(Debug, Clone)]
struct Block {
    /// conv1/bn1, conv2/bn2 (and conv3/bn3 for a Bottleneck); ReLU between them.
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        vb: VarBuilder,
        kind: BlockKind,
        cin: usize,
        planes: usize,
        stride: usize,
        eps: f64,
    ) -> Result<Self> {
        let cout = planes * kind.expansion();
        let convs = match kind {
            BlockKind::Basic => vec![
                ConvBn::new(&vb, 1, (cin, planes), 3, stride, eps)?,
                ConvBn::new(&vb, 2, (planes, planes), 3, 1, eps)?,
            ],
            BlockKind::Bottleneck => vec![
                ConvBn::new(&vb, 1, (cin, planes), 1, 1, eps)?,
                ConvBn::new(&vb, 2, (planes, planes), 3, stride, eps)?,
                ConvBn::new(&vb, 3, (planes, cout), 1, 1, eps)?,
            ],
        };
        let downsample = if stride != 1 || cin != cout {
            let ds = vb.pp("downsample");
            let c = Conv::load(ds.pp("0"), (cin, cout), 1, stride, 0)?;
            Some(ConvBn::assemble(c, bn(ds.pp("1"), cout, eps)?)?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            h = c.forward(&h, train)?;
            if i < last {
                h = h.relu()?;
            }
        }
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward(x, train)?,
            None => x.clone(),
        };
        Ok((h + shortcut)?.relu()?)
    }
}

/// A ResNet classifier; see the module docs for the naming and the two stems.
#[derive(Debug, Clone)]
pub struct ResNet {
    config: ResNetConfig,
    mean: Tensor,
    inv_std: Tensor,
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
    fc: Linear,
}

impl ResNet {
    pub fn new(vb: VarBuilder, config: &ResNetConfig) -> Result<Self> {
        config.validate()?;
        let eps = config.bn_eps;
        let (k, stride) = match config.stem {
            Stem::ImageNet => (7, 2),
            Stem::Small => (3, 1),
        };
        let stem = ConvBn::new(
            &vb,
            1,
            (config.in_channels, config.stem_width),
            k,
            stride,
            eps,
        )?;
        let mut cin = config.stem_width;
        let mut stages = Vec::with_capacity(config.layers.len());
        for (i, (&depth, &planes)) in config.layers.iter().zip(&config.widths).enumerate() {
            let svb = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::with_capacity(depth);
            for j in 0..depth {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    svb.pp(j),
                    config.block,
                    cin,
                    planes,
                    stride,
                    eps,
                )?);
                cin = planes * config.block.expansion();
            }
            stages.push(blocks);
        }
        let fc = candle_nn::linear(cin, config.num_classes, vb.pp("fc"))?;
        let channel_param = |v: &[f64]| -> Result<Tensor> {
            let t = Tensor::from_vec(v.to_vec(), (1, v.len(), 1, 1), vb.device())?;
            Ok(t.to_dtype(vb.dtype())?)
        };
        let inv: Vec<f64> = config.std.iter().map(|s| 1.0 / s).collect();
        Ok(Self {
            mean: channel_param(&config.mean)?,
            inv_std: channel_param(&inv)?,
            config: config.clone(),
            stem,
            stages,
            fc,
        })
    }

    /// Opens a checkpoint (safetensors or PyTorch pickle, torchvision names) and builds the model,
    /// failing with one [`EngineError::WeightMismatch`] if the tensors do not fit the config.
    pub fn load(path: &Path, config: &ResNetConfig, dtype: DType, device: &Device) -> Result<Self> {
        let opts = LoadOptions::new(dtype, device).ignoring(IGNORE_BN_COUNTERS);
        Checkpoint::open(path)?.load(&opts, |vb| Self::new(vb, config))
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// Logits for `n` images given as plain pixels in [0,1], laid out (N, C, H, W) with the
    /// model's channel count: for callers that hold pixels rather than tensors.
    pub fn logits_from_pixels(
        &self,
        pixels: Vec<f32>,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let c = self.config.in_channels;
        if pixels.len() != n * c * h * w {
            return Err(EngineError::InvalidInput(format!(
                "{} pixel values for {n} images of {c}×{h}×{w}",
                pixels.len()
            )));
        }
        let x = Tensor::from_vec(pixels, (n, c, h, w), self.mean.device())?;
        let x = x.to_dtype(self.mean.dtype())?;
        let logits = self.forward_t(&x, false)?.logits.to_dtype(DType::F32)?;
        Ok(logits.to_vec2()?)
    }

    /// Forward pass; `train` switches BatchNorm to batch statistics (training only).
    pub fn forward_t(&self, x01: &Tensor, train: bool) -> Result<ClassifierOutput> {
        let (_, c, _, _) = x01.dims4()?;
        if c != self.config.in_channels {
            return Err(EngineError::InvalidInput(format!(
                "classifier expects {} input channels, got {c}",
                self.config.in_channels
            )));
        }
        // Inputs of another dtype are converted (differentiably) rather than rejected.
        let x = x01.to_dtype(self.mean.dtype())?;
        let x = x.broadcast_sub(&self.mean)?.broadcast_mul(&self.inv_std)?;
        let mut h = self.stem.forward(&x, train)?.relu()?;
        if self.config.stem == Stem::ImageNet {
            h = MaxPool2d::RESNET_STEM.forward(&h)?;
        }
        for block in self.stages.iter().flatten() {
            h = block.forward(&h, train)?;
        }
        let penultimate = global_avg_pool(&h)?;
        let logits = self.fc.forward(&penultimate)?;
        Ok(ClassifierOutput {
            logits,
            penultimate,
            features: h,
        })
    }

    fn label_index(&self, labels: &[LabelId], n: usize) -> Result<Tensor> {
        if labels.len() != n {
            return Err(EngineError::InvalidInput(format!(
                "{} labels for a batch of {n}",
                labels.len()
            )));
        }
        if let Some(bad) = labels
            .iter()
            .find(|l| l.0 as usize >= self.config.num_classes)
        {
            return Err(EngineError::InvalidInput(format!(
                "label {} out of range for {} classes",
                bad.0, self.config.num_classes
            )));
        }
        let idx: Vec<u32> = labels.iter().map(|l| l.0).collect();
        Ok(Tensor::from_vec(idx, n, self.mean.device())?)
    }
}

impl Classifier for ResNet {
    fn forward(&self, x01: &Tensor) -> Result<ClassifierOutput> {
        self.forward_t(x01, false)
    }

    fn log_prob_input_grad(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor> {
        let idx = self.label_index(labels, x01.dim(0)?)?;
        let x = Var::from_tensor(&x01.detach())?;
        let logits = self.forward_t(x.as_tensor(), false)?.logits;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&idx.unsqueeze(1)?, 1)?.sum_all()?;
        let grads = picked.backward()?;
        grads.get(x.as_tensor()).cloned().ok_or_else(|| {
            EngineError::InvalidInput("the loss does not depend on the input".into())
        })
    }

    /// Analytic Grad-CAM of the GAP + fc head: ∂z_y/∂A_{c,h,w} = W_fc[y,c]/(h·w) everywhere, so
    /// the map is ReLU(Σ_c W_fc[y,c]·A_c)/(h·w) with no backward pass (spec §7).
    fn grad_cam(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor> {
        let a = self.forward_t(x01, false)?.features;
        let (n, c, h, w) = a.dims4()?;
        let rows = self
            .fc
            .weight()
            .index_select(&self.label_index(labels, n)?, 0)?;
        let weighted = a.broadcast_mul(&rows.reshape((n, c, 1, 1))?)?.sum(1)?;
        Ok((weighted.relu()? / (h * w) as f64)?)
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }
}
