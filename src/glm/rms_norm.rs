//! `GlmRMSNorm`: RMS normalisation computed in fp32, scaled in the input dtype.

use tch::{nn, Kind, Tensor};

#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(path: nn::Path, size: i64, eps: f64) -> Self {
        Self {
            weight: path.var("weight", &[size], nn::Init::Const(1.0)),
            eps,
        }
    }

    /// # Shapes
    /// `x`: `[..., hidden]` → same shape and dtype.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dtype = x.kind();
        // Variance in fp32 even for bf16 activations (transformers does the same);
        // the weight multiplies after casting back, in the input dtype.
        let x32 = x.to_kind(Kind::Float);
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = x32 * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(dtype)
    }
}
