//! `nn.Linear` with HF parameter names (`weight` `[out, in]`, optional `bias` `[out]`).

use tch::{nn, Tensor};

/// A dense layer `y = x Wᵀ + b`, stored as transformers stores it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Creates `weight` (and `bias` when asked) under `path`; values are filled
    /// by the checkpoint loader or [`crate::glm::GlmForCausalLM::init_random`].
    pub fn new(path: nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let weight = path.var("weight", &[out_features, in_features], nn::Init::Const(0.0));
        let bias = bias.then(|| path.var("bias", &[out_features], nn::Init::Const(0.0)));
        Self { weight, bias }
    }

    /// # Shapes
    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}
