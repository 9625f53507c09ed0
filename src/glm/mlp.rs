//! `GlmMLP`: fused gate/up projection, SiLU gating, down projection.

use tch::{nn, Tensor};
use trl_like::nn::Linear;

#[derive(Debug)]
pub struct Mlp {
    pub gate_up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn new(path: nn::Path, hidden: i64, intermediate: i64) -> Self {
        Self {
            gate_up_proj: Linear::new(&path / "gate_up_proj", hidden, 2 * intermediate, false),
            down_proj: Linear::new(&path / "down_proj", intermediate, hidden, false),
        }
    }

    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        // The first half of gate_up_proj's output is the gate, the second the up projection.
        let gate_up = self.gate_up_proj.forward_t(x, train).chunk(2, -1);
        self.down_proj
            .forward_t(&(gate_up[0].silu() * &gate_up[1]), train)
    }
}
