//! Guidance signals: classifier guidance with Clean Grad (spec §5) and the Distinct Semantic
//! Guidance mask for classifier-free guidance (spec §7). The CFG mixing itself is
//! [`crate::ddim::cfg_eps`].

use candle_core::{D, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::ddim::pred_x0;
use crate::model::{Classifier, LabelId};
use crate::ops::resize::{NearestGather, bilinear_resize};
use crate::{EngineError, Result};

/// One square cutout: `u[.., oy..oy+size, ox..ox+size]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutBox {
    pub size: usize,
    pub ox: usize,
    pub oy: usize,
}

/// Random square cutouts resized (nearest) to the classifier's input size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CutoutSpec {
    /// Cutouts per guided step (8 in the paper).
    pub num: usize,
    /// Classifier input side, also the smallest crop side (224).
    pub size: usize,
    /// Crop side = floor(r^cut_pow·(max − min) + min), r ~ U[0,1).
    pub cut_pow: f64,
}

impl CutoutSpec {
    /// Draws `num` boxes for an (h, w) image in the reference's order: r, then ox, then oy.
    pub fn draw(&self, rng: &mut StdRng, hw: (usize, usize)) -> Result<Vec<CutBox>> {
        let side = hw.0.min(hw.1);
        let min_size = side.min(self.size);
        (0..self.num)
            .map(|_| {
                let r: f64 = rng.random();
                let size = (r.powf(self.cut_pow) * (side - min_size) as f64 + min_size as f64)
                    .floor() as usize;
                let size = size.clamp(1, side);
                let ox = rng.random_range(0..=hw.1 - size);
                let oy = rng.random_range(0..=hw.0 - size);
                Ok(CutBox { size, ox, oy })
            })
            .collect()
    }
}

/// Clean Grad settings (§5). The gradient is taken w.r.t. the blend x̃, never through the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CleanGrad {
    /// s: the classifier scale (3.0).
    pub scale: f64,
    /// Blend x̃ = γ·x̂0 + (1−γ)·x_j with γ = √(1−ᾱ_j); false = the ablation `no_x0_hat` (x̃ = x_j).
    pub blend: bool,
    /// Cutouts; `None` = the ablation `cutouts_num = −1` (the whole image is classified).
    pub cutouts: Option<CutoutSpec>,
}

/// The point the classifier sees: x̃ = γ·x̂0 + (1 − γ)·x_j, x̂0 unclipped from the already computed ε.
pub fn blended_input(x: &Tensor, eps: &Tensor, abar: &[f64], blend: bool) -> Result<Tensor> {
    if !blend {
        return Ok(x.clone());
    }
    let x0 = pred_x0(x, eps, abar)?;
    let gammas: Vec<f64> = abar.iter().map(|a| (1.0 - a).sqrt()).collect();
    let per_item = |c: &[f64]| -> Result<Tensor> {
        let n = if c.len() == 1 { 1 } else { x.dim(0)? };
        Ok(Tensor::from_vec(c.to_vec(), (n, 1, 1, 1), x.device())?.to_dtype(x.dtype())?)
    };
    let g = per_item(&gammas)?;
    let one_minus: Vec<f64> = gammas.iter().map(|g| 1.0 - g).collect();
    Ok((x0.broadcast_mul(&g)? + x.broadcast_mul(&per_item(&one_minus)?)?)?)
}

impl CleanGrad {
    /// g = s·∂/∂x̃ Σ_k Σ_i log_softmax(f(cut_k(u_i)))\[y_i\], u = (x̃ + 1)/2, for x (B,C,H,W) at
    /// level ᾱ (one value or one per item) with the network's raw ε. `boxes` are this step's
    /// cutouts (shared by the whole batch); ignored when cutouts are off.
    pub fn gradient(
        &self,
        classifier: &dyn Classifier,
        x: &Tensor,
        eps: &Tensor,
        abar: &[f64],
        labels: &[LabelId],
        boxes: &[CutBox],
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        if labels.len() != b {
            return Err(EngineError::InvalidInput(format!(
                "{} labels for a batch of {b}",
                labels.len()
            )));
        }
        let u = blended_input(x, eps, abar, self.blend)?.affine(0.5, 0.5)?;
        let grad_u = match &self.cutouts {
            None => classifier.log_prob_input_grad(&u, labels)?,
            Some(spec) => cutout_grad(classifier, &u, labels, boxes, spec.size, (h, w))?,
        };
        // ½ is the chain factor of u = (x̃ + 1)/2.
        Ok(grad_u.affine(0.5 * self.scale, 0.0)?)
    }
}

/// Σ over cutouts of the classifier's input gradient, scattered back onto u through each gather.
fn cutout_grad(
    classifier: &dyn Classifier,
    u: &Tensor,
    labels: &[LabelId],
    boxes: &[CutBox],
    out: usize,
    hw: (usize, usize),
) -> Result<Tensor> {
    if boxes.is_empty() {
        return Err(EngineError::InvalidInput(
            "cutouts are on but no boxes were given".into(),
        ));
    }
    let b = u.dim(0)?;
    let gathers = boxes
        .iter()
        .map(|bx| {
            NearestGather::crop_resize(hw, (bx.oy, bx.ox, bx.size, bx.size), (out, out), u.device())
        })
        .collect::<Result<Vec<_>>>()?;
    let crops = gathers
        .iter()
        .map(|g| g.forward(u))
        .collect::<Result<Vec<_>>>()?;
    let crops = Tensor::cat(&crops, 0)?;
    let all_labels: Vec<LabelId> = boxes.iter().flat_map(|_| labels.iter().copied()).collect();
    let crop_grads = classifier.log_prob_input_grad(&crops, &all_labels)?;
    let mut total = Tensor::zeros(u.shape(), u.dtype(), u.device())?;
    for (k, g) in gathers.iter().enumerate() {
        total = (total + g.backward(&crop_grads.narrow(0, k * b, b)?)?)?;
    }
    Ok(total)
}

/// The DSG mask and its intermediate stages (§7), for inspection and tests.
#[derive(Debug, Clone)]
pub struct DsgMask {
    /// Grad-CAM bilinearly upsampled to the image size (N, H, W), not normalised.
    pub upsampled: Tensor,
    /// After per-image min-max (N, H, W).
    pub minmax: Tensor,
    /// {0,1} u8 (N, C, H, W).
    pub image: Tensor,
    /// {0,1} u8 (N, C, h, w): nearest-downsampled to the latent, what the sampler applies.
    pub latent: Tensor,
}

/// Per-image min-max with pytorch-grad-cam's arithmetic: (c − min) / (1e-7 + max(c − min)).
pub fn minmax_per_image(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let flat = x.reshape((n, ()))?;
    let shifted = flat.broadcast_sub(&flat.min_keepdim(D::Minus1)?)?;
    let denom = (shifted.max_keepdim(D::Minus1)? + 1e-7)?;
    Ok(shifted.broadcast_div(&denom)?.reshape(x.shape())?)
}

/// From a low-resolution Grad-CAM (N, h, w): upsample (bilinear, align_corners = False) to
/// `image_hw`, min-max per image, cut strictly above `cut` (a negative cut keeps values below
/// |cut|), repeat over `channels`, nearest-downsample to `latent_hw`.
pub fn dsg_mask_from_cam(
    cam: &Tensor,
    image_hw: (usize, usize),
    latent_hw: (usize, usize),
    channels: usize,
    cut: f64,
) -> Result<DsgMask> {
    let (n, _, _) = cam.dims3()?;
    let upsampled = bilinear_resize(&cam.unsqueeze(1)?, image_hw.0, image_hw.1)?.squeeze(1)?;
    let minmax = minmax_per_image(&upsampled)?;
    let binary = if cut >= 0.0 {
        minmax.gt(cut)?
    } else {
        minmax.lt(-cut)?
    };
    let image = binary
        .unsqueeze(1)?
        .repeat((1, channels, 1, 1))?
        .reshape((n, channels, image_hw.0, image_hw.1))?;
    let latent = NearestGather::resize(image_hw, latent_hw, cam.device())?.forward(&image)?;
    Ok(DsgMask {
        upsampled,
        minmax,
        image,
        latent,
    })
}

/// The DSG mask for images `x01` (N, C, H, W) in \[0,1\] and their labels.
pub fn dsg_mask(
    classifier: &dyn Classifier,
    x01: &Tensor,
    labels: &[LabelId],
    latent_hw: (usize, usize),
    latent_channels: usize,
    cut: f64,
) -> Result<DsgMask> {
    let (_, _, h, w) = x01.dims4()?;
    let cam = classifier.grad_cam(x01, labels)?;
    dsg_mask_from_cam(&cam, (h, w), latent_hw, latent_channels, cut)
}
