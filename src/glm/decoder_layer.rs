//! `GlmDecoderLayer` / `Glm4DecoderLayer`: pre-norm attention and MLP blocks.
//! GLM-4-0414 (`model_type: "glm4"`) also normalises each block's output
//! (`post_self_attn_layernorm`, `post_mlp_layernorm`) before the residual add.

use super::attention::{Attention, Positions};
use super::mlp::Mlp;
use super::rms_norm::RmsNorm;
use super::GlmConfig;
use tch::{nn, Tensor};
use trl_like::modeling::KvCache;

#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub post_self_attn_layernorm: Option<RmsNorm>,
    pub post_mlp_layernorm: Option<RmsNorm>,
}

impl DecoderLayer {
    pub fn new(path: nn::Path, cfg: &GlmConfig, layer_idx: usize) -> Self {
        let norm = |name: &str| RmsNorm::new(&path / name, cfg.hidden_size, cfg.rms_norm_eps);
        let post = cfg.has_post_norms();
        Self {
            self_attn: Attention::new(&path / "self_attn", cfg, layer_idx),
            mlp: Mlp::new(&path / "mlp", cfg.hidden_size, cfg.intermediate_size),
            input_layernorm: norm("input_layernorm"),
            post_attention_layernorm: norm("post_attention_layernorm"),
            post_self_attn_layernorm: post.then(|| norm("post_self_attn_layernorm")),
            post_mlp_layernorm: post.then(|| norm("post_mlp_layernorm")),
        }
    }

    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let mut attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), pos, cache, train);
        if let Some(norm) = &self.post_self_attn_layernorm {
            attn = norm.forward(&attn);
        }
        let x = x + attn;
        let mut mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x), train);
        if let Some(norm) = &self.post_mlp_layernorm {
            mlp = norm.forward(&mlp);
        }
        x + mlp
    }
}
