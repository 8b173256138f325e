//! VGG16 features with L2 pooling and the DISTS image similarity exactly as piq 0.7.0 computes it
//! (spec §8.2).
//!
//! Tensor names are torchvision's `features.{0,2,5,…,28}` plus DISTS' `alpha` / `beta`
//! (1, 1475, 1, 1), so the official torchvision VGG16 checkpoint and piq's `dists_weights.pt`
//! load unchanged. Every MaxPool is replaced by piq's L2 pool:
//! sqrt(depthwise_conv(x², hann 3×3, stride 2, zero pad 1) + 1e-12).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::models::load::{Checkpoint, LoadOptions};
use crate::models::resnet::{IMAGENET_MEAN, IMAGENET_STD};
use crate::ops::conv::conv2d;
use crate::{EngineError, Result};

/// torchvision `features` indices of the 13 convolutions, grouped by stage; each stage ends at
/// relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
const STAGES: [&[usize]; 5] = [
    &[0, 2],
    &[5, 7],
    &[10, 12, 14],
    &[17, 19, 21],
    &[24, 26, 28],
];
const WIDTHS: [usize; 5] = [64, 128, 256, 512, 512];
/// Channels of the 6 DISTS stages (raw input + the 5 VGG stages); they sum to 1475.
pub const DISTS_CHANNELS: [usize; 6] = [3, 64, 128, 256, 512, 512];
/// piq's stabilising constants c1 = c2.
const DISTS_C: f64 = 1e-6;
/// piq's L2 pool epsilon under the square root.
const L2_POOL_EPS: f64 = 1e-12;

/// Architecture knobs of [`Vgg16Features`]; the defaults are torchvision's.
#[derive(Debug, Clone, PartialEq)]
pub struct VggConfig {
    /// Input normalisation applied inside the model to the [0,1] input.
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Default for VggConfig {
    fn default() -> Self {
        Self {
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// VGG16 `features` up to relu5_3, L2-pooled between stages.
#[derive(Debug, Clone)]
pub struct Vgg16Features {
    /// Per stage, (weight, bias) of each 3×3 pad-1 convolution.
    stages: Vec<Vec<(Tensor, Tensor)>>,
    mean: Tensor,
    inv_std: Tensor,
    pool_kernel: Tensor,
}

impl Vgg16Features {
    pub fn new(vb: VarBuilder, config: &VggConfig) -> Result<Self> {
        let vf = vb.pp("features");
        let mut cin = 3;
        let mut stages = Vec::with_capacity(STAGES.len());
        for (indices, &width) in STAGES.iter().zip(&WIDTHS) {
            let mut convs = Vec::with_capacity(indices.len());
            for &i in *indices {
                let v = vf.pp(i);
                convs.push((v.get((width, cin, 3, 3), "weight")?, v.get(width, "bias")?));
                cin = width;
            }
            stages.push(convs);
        }
        let dev = vb.device();
        let channel = |v: [f64; 3]| -> Result<Tensor> {
            Ok(Tensor::new(&v, dev)?
                .reshape((1, 3, 1, 1))?
                .to_dtype(vb.dtype())?)
        };
        Ok(Self {
            stages,
            mean: channel(config.mean)?,
            inv_std: channel(config.std.map(|s| 1.0 / s))?,
            pool_kernel: l2_pool_kernel(dev)?.to_dtype(vb.dtype())?,
        })
    }

    /// Activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 for an image in [0,1].
    pub fn forward_stages(&self, x01: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x01
            .broadcast_sub(&self.mean)?
            .broadcast_mul(&self.inv_std)?;
        let mut out = Vec::with_capacity(self.stages.len());
        for (i, convs) in self.stages.iter().enumerate() {
            if i > 0 {
                h = self.l2_pool(&h)?;
            }
            for (w, b) in convs {
                h = conv2d(&h, w, Some(b), 1, 1)?.relu()?;
            }
            out.push(h.clone());
        }
        Ok(out)
    }

    /// The same hann kernel on every channel, so the depthwise conv is one single-channel conv
    /// over the (N·C) planes (candle runs a grouped conv as one conv per group).
    fn l2_pool(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let planes = x.sqr()?.reshape((n * c, 1, h, w))?;
        let pooled = conv2d(&planes, &self.pool_kernel, None, 2, 1)?;
        let (_, _, oh, ow) = pooled.dims4()?;
        Ok((pooled.reshape((n, c, oh, ow))? + L2_POOL_EPS)?.sqrt()?)
    }
}

/// piq `hann_filter(3)`: the outer product of [½, 1, ½], normalised to sum 1, as (1,1,3,3).
pub fn l2_pool_kernel(dev: &Device) -> Result<Tensor> {
    let k = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0].map(|v: f64| v / 16.0);
    Ok(Tensor::new(&k, dev)?.reshape((1, 1, 3, 3))?)
}

/// The six feature stages of one batch of images, kept so that one image can be compared with
/// many without recomputing its features (the early stop compares against a fixed input).
#[derive(Debug, Clone)]
pub struct DistsFeatures {
    /// Stage 0 is the raw input; all stages in f64 for the statistics.
    stages: Vec<Tensor>,
}

impl DistsFeatures {
    pub fn batch_size(&self) -> Result<usize> {
        Ok(self.stages[0].dim(0)?)
    }
}

/// DISTS (Ding et al. 2020) with piq 0.7.0's conventions; see [`Dists::similarity`].
#[derive(Debug, Clone)]
pub struct Dists {
    vgg: Vgg16Features,
    /// Per stage (1, C_k) in f64.
    alpha: Vec<Tensor>,
    beta: Vec<Tensor>,
}

impl Dists {
    /// VGG16 features and `alpha` / `beta` from one VarBuilder (the golden's single-file layout).
    pub fn new(vb: VarBuilder, config: &VggConfig) -> Result<Self> {
        let vgg = Vgg16Features::new(vb.clone(), config)?;
        let (alpha, beta) = read_alpha_beta(&vb)?;
        Self::from_parts(vgg, &alpha, &beta)
    }

    /// Assembles DISTS from a feature network and the two (1,1475,1,1) weight tensors.
    pub fn from_parts(vgg: Vgg16Features, alpha: &Tensor, beta: &Tensor) -> Result<Self> {
        Ok(Self {
            vgg,
            alpha: split_stages(alpha)?,
            beta: split_stages(beta)?,
        })
    }

    /// One file holding `features.*`, `alpha` and `beta`.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let opts = LoadOptions::new(dtype, device);
        Checkpoint::open(path)?.load(&opts, |vb| Self::new(vb, &VggConfig::default()))
    }

    /// The official pair: torchvision's VGG16 checkpoint (its `classifier.*` head is not needed)
    /// and piq's `dists_weights.pt` with `alpha` and `beta`.
    pub fn load_split(
        vgg: &Path,
        alpha_beta: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vgg_opts = LoadOptions::new(dtype, device).ignoring("classifier.*");
        let features = Checkpoint::open(vgg)?.load(&vgg_opts, |vb| {
            Vgg16Features::new(vb, &VggConfig::default())
        })?;
        let ab_opts = LoadOptions::new(DType::F64, device);
        let (alpha, beta) =
            Checkpoint::open(alpha_beta)?.load(&ab_opts, |vb| read_alpha_beta(&vb))?;
        Self::from_parts(features, &alpha, &beta)
    }

    /// Feature stages of images in [0,1] (N,3,H,W), min(H,W) ≤ 256. Values outside [0,1] are
    /// accepted as piq does (the early stop compares unclamped noisy images).
    pub fn features(&self, x01: &Tensor) -> Result<DistsFeatures> {
        let (_, c, h, w) = x01.dims4()?;
        if c != 3 {
            return Err(EngineError::InvalidInput(format!(
                "DISTS needs RGB images, got {c} channels"
            )));
        }
        if h.min(w) > 256 {
            // piq bilinearly downscales such inputs first; DiffGuard never feeds them.
            return Err(EngineError::InvalidInput(format!(
                "DISTS inputs must have min(H,W) ≤ 256, got {h}×{w}"
            )));
        }
        let dtype = self.vgg.mean.dtype();
        let mut stages = vec![x01.to_dtype(DType::F64)?];
        for s in self.vgg.forward_stages(&x01.to_dtype(dtype)?)? {
            stages.push(s.to_dtype(DType::F64)?);
        }
        Ok(DistsFeatures { stages })
    }

    /// 1 − DISTS(a, b) per pair: higher = more similar, 1 for identical images. Batches of equal
    /// size are compared pairwise; a batch of one is compared with every image of the other.
    pub fn similarity(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<f64>> {
        self.similarity_features(&self.features(a01)?, &self.features(b01)?)
    }

    /// [`Dists::similarity`] on precomputed features.
    pub fn similarity_features(&self, a: &DistsFeatures, b: &DistsFeatures) -> Result<Vec<f64>> {
        let terms = self.stage_terms_features(a, b)?;
        Ok(terms
            .iter()
            .map(|stages| stages.iter().map(|[s1, s2]| s1 + s2).sum())
            .collect())
    }

    /// Per pair and stage (0 = raw input, 1..5 = relu1_2 … relu5_3): [Σ_c α·S1, Σ_c β·S2].
    pub fn stage_terms(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<[[f64; 2]; 6]>> {
        self.stage_terms_features(&self.features(a01)?, &self.features(b01)?)
    }

    /// [`Dists::stage_terms`] on precomputed features.
    pub fn stage_terms_features(
        &self,
        a: &DistsFeatures,
        b: &DistsFeatures,
    ) -> Result<Vec<[[f64; 2]; 6]>> {
        let (na, nb) = (a.batch_size()?, b.batch_size()?);
        if na != nb && na != 1 && nb != 1 {
            return Err(EngineError::InvalidInput(format!(
                "DISTS compares equal batches or one image with a batch, got {na} and {nb}"
            )));
        }
        if a.stages[0].dims()[1..] != b.stages[0].dims()[1..] {
            return Err(EngineError::InvalidInput(format!(
                "DISTS images differ in size: {:?} vs {:?}",
                a.stages[0].dims(),
                b.stages[0].dims()
            )));
        }
        let mut out = vec![[[0.0; 2]; 6]; na.max(nb)];
        for (k, (fa, fb)) in a.stages.iter().zip(&b.stages).enumerate() {
            let (s1, s2) = structure_texture(fa, fb)?;
            let t1 = s1.broadcast_mul(&self.alpha[k])?.sum(1)?.to_vec1::<f64>()?;
            let t2 = s2.broadcast_mul(&self.beta[k])?.sum(1)?.to_vec1::<f64>()?;
            for (i, row) in out.iter_mut().enumerate() {
                row[k] = [t1[i], t2[i]];
            }
        }
        Ok(out)
    }
}

/// S1 (mean/"texture") and S2 (covariance/"structure") terms per image and channel, (N, C),
/// with population statistics over H·W as piq computes them.
fn structure_texture(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let flat = |t: &Tensor| t.flatten_from(2);
    let (a, b) = (flat(a)?, flat(b)?);
    let mean = |t: &Tensor| t.mean_keepdim(2);
    let (ma, mb) = (mean(&a)?, mean(&b)?);
    let var = |t: &Tensor, m: &Tensor| -> candle_core::Result<Tensor> {
        t.broadcast_sub(m)?.sqr()?.mean_keepdim(2)
    };
    let (va, vb) = (var(&a, &ma)?, var(&b, &mb)?);
    let cov = (mean(&a.broadcast_mul(&b)?)? - ma.broadcast_mul(&mb)?)?;
    let s1 = ((ma.broadcast_mul(&mb)? * 2.0)? + DISTS_C)?
        .broadcast_div(&((ma.sqr()?.broadcast_add(&mb.sqr()?)? + DISTS_C)?))?;
    let s2 = ((cov * 2.0)? + DISTS_C)?.broadcast_div(&((va.broadcast_add(&vb)? + DISTS_C)?))?;
    Ok((s1.squeeze(2)?, s2.squeeze(2)?))
}

fn read_alpha_beta(vb: &VarBuilder) -> Result<(Tensor, Tensor)> {
    let shape = (1, DISTS_CHANNELS.iter().sum::<usize>(), 1, 1);
    Ok((vb.get(shape, "alpha")?, vb.get(shape, "beta")?))
}

/// (1,1475,1,1) → per stage (1, C_k) in f64.
fn split_stages(w: &Tensor) -> Result<Vec<Tensor>> {
    let flat = w.to_dtype(DType::F64)?.flatten_all()?;
    let total: usize = DISTS_CHANNELS.iter().sum();
    if flat.dim(0)? != total {
        return Err(EngineError::InvalidInput(format!(
            "DISTS weights need {total} values, got {}",
            flat.dim(0)?
        )));
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(DISTS_CHANNELS.len());
    for c in DISTS_CHANNELS {
        out.push(flat.narrow(0, start, c)?.unsqueeze(0)?);
        start += c;
    }
    Ok(out)
}

/// DISTS as the engine's similarity: what the GDM / LDM recipes score and early-stop with.
impl crate::similarity::ImageSimilarity for Dists {
    fn similarity(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<f64>> {
        Dists::similarity(self, a01, b01)
    }
}
