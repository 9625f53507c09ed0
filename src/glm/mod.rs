//! GLM-4 in tch, module for module as transformers' `models/glm/modeling_glm.py`
//! and `models/glm4/modeling_glm4.py`.

pub mod attention;
pub mod config;
pub mod decoder_layer;
pub mod loading;
pub mod mlp;
pub mod model;
pub mod rms_norm;
pub mod rotary;

pub use config::GlmConfig;
pub use loading::LoadError;
pub use model::{Glm4ForCausalLM, GlmForCausalLM, GlmModel};
