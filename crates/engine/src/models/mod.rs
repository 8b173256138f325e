//! The networks, one file per architecture, plus weight loading.

pub mod adm_unet;
pub mod catalog;
pub mod class_embedder;
pub mod diffusers;
pub mod layers;
pub mod ldm_unet;
pub mod load;
pub mod pixel_unet;
pub mod resnet;
pub mod vgg;
pub mod vq;
