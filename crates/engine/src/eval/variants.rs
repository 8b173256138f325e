//! DiffGuard variants evaluated next to the bundle's own recipe: the same networks under a recipe
//! override (with/without the DSG mask, with Clean Grad classifier guidance, with/without
//! adaptive early stop), so an evaluation shows what each part of the recipe contributes.

use crate::early_stop::EarlyStop;
use crate::recipe::Recipe;
use crate::{EngineError, Result};

/// The paper's classifier-guidance scale (spec §5).
const CLEAN_GRAD_SCALE: f64 = 3.0;
/// The paper's PSNR early-stop threshold in code units (spec §6; paper 6.39 dB).
const AES_PSNR: f64 = 48.5;

/// Every variant id, in report order.
pub const VARIANT_IDS: [&str; 4] = ["recipe", "dsg", "clean-grad", "aes"];

/// The id `dsg` had when it could only remove the mask; still accepted.
const DSG_ALIAS: &str = "no-dsg";

/// A named recipe override.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Short id used on the command line and in the cache.
    pub id: String,
    /// Row name in the tables.
    pub name: String,
    pub recipe: Recipe,
}

/// The override `id` of `base`, or `None` where it does not apply (e.g. `dsg` on the GDM recipe,
/// which has no classifier-free guidance to mask, `clean-grad` on one that already guides with
/// the classifier).
pub fn variant(base: &Recipe, id: &str) -> Result<Option<Variant>> {
    let id = if id == DSG_ALIAS { "dsg" } else { id };
    let mut r = base.clone();
    let name = match (id, &mut r) {
        ("recipe", _) => "DiffGuard".to_string(),
        ("dsg", Recipe::PixelCfg(p)) => toggle_dsg(&mut p.use_cam),
        ("dsg", Recipe::Ldm(l)) => toggle_dsg(&mut l.use_cam),
        ("clean-grad", Recipe::PixelCfg(p)) if p.classifier_scale == 0.0 => {
            p.classifier_scale = CLEAN_GRAD_SCALE;
            format!("DiffGuard + Clean Grad (s={CLEAN_GRAD_SCALE})")
        }
        ("aes", Recipe::PixelCfg(p)) => toggle_aes(&mut p.early_stop),
        ("aes", Recipe::Gdm(g)) => toggle_aes(&mut g.early_stop),
        (other, _) if VARIANT_IDS.contains(&other) => return Ok(None),
        (other, _) => {
            return Err(EngineError::InvalidInput(format!(
                "unknown DiffGuard variant `{other}` (known: {})",
                VARIANT_IDS.join(", ")
            )));
        }
    };
    Ok(Some(Variant {
        id: id.into(),
        name,
        recipe: r,
    }))
}

/// Flips the Grad-CAM (DSG) mask on the CFG steps. Returns the row name.
fn toggle_dsg(use_cam: &mut bool) -> String {
    *use_cam = !*use_cam;
    if *use_cam {
        "DiffGuard + DSG mask".into()
    } else {
        "DiffGuard w/o DSG mask".into()
    }
}

/// Flips adaptive early stop: off when the recipe has it, PSNR-only at the paper's threshold when
/// it has none (PSNR needs no extra network). Returns the row name.
fn toggle_aes(slot: &mut EarlyStop) -> String {
    if slot.enabled() {
        *slot = EarlyStop::OFF;
        "DiffGuard w/o AES".into()
    } else {
        *slot = EarlyStop {
            psnr: AES_PSNR,
            dists: -1.0,
        };
        format!("DiffGuard + AES (PSNR {AES_PSNR})")
    }
}

/// The requested variants (all applicable ones when `ids` is empty), `recipe` always first.
/// An explicitly requested variant that does not apply is an error.
pub fn variants(base: &Recipe, ids: &[String]) -> Result<Vec<Variant>> {
    let explicit = !ids.is_empty();
    let wanted: Vec<String> = if explicit {
        ids.to_vec()
    } else {
        VARIANT_IDS.iter().map(|s| s.to_string()).collect()
    };
    let mut out = vec![variant(base, "recipe")?.ok_or_else(|| {
        EngineError::InvalidInput("the bundle's recipe is always evaluated".into())
    })?];
    for id in wanted.iter().filter(|id| id.as_str() != "recipe") {
        match variant(base, id)? {
            Some(v) => {
                v.recipe.validate()?;
                out.push(v);
            }
            None if explicit => {
                return Err(EngineError::InvalidInput(format!(
                    "variant `{id}` does not apply to this recipe"
                )));
            }
            None => {}
        }
    }
    Ok(out)
}
