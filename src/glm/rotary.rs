//! `GlmRotaryEmbedding` + `apply_rotary_pos_emb`: partial, *interleaved* rotary
//! embeddings as in transformers' modeling_glm.py.
//!
//! Only the first `rotary_dim = head_dim * partial_rotary_factor` dims of each
//! head rotate (64 of 128 for GLM-4), in adjacent pairs `(x0, x1), (x2, x3), …`
//! (not the two-halves layout of Llama); the rest passes through unchanged.

use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct Rotary {
    /// `[rotary_dim / 2]`, fp32.
    inv_freq: Tensor,
    rotary_dim: i64,
}

impl Rotary {
    pub fn new(rotary_dim: i64, theta: f64, device: Device) -> Self {
        // inv_freq = 1 / theta^(2i / dim), computed in fp32 as transformers does.
        let exponents = Tensor::arange_start_step(0, rotary_dim, 2, (Kind::Int64, device))
            .to_kind(Kind::Float)
            / rotary_dim as f64;
        let inv_freq = (Tensor::from(theta)
            .to_kind(Kind::Float)
            .to_device(device)
            .pow(&exponents))
        .reciprocal();
        Self {
            inv_freq,
            rotary_dim,
        }
    }

    /// cos/sin tables for the given positions, each angle repeated for its pair.
    ///
    /// # Shapes
    /// `position_ids`: `[batch, seq]` → `(cos, sin)`, each `[batch, seq, rotary_dim]` fp32.
    pub fn cos_sin(&self, position_ids: &Tensor) -> (Tensor, Tensor) {
        let freqs =
            position_ids.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let freqs = freqs.repeat_interleave_self_int(2, -1, None);
        (freqs.cos(), freqs.sin())
    }

    /// Rotates the first `rotary_dim` dims of every head.
    ///
    /// # Shapes
    /// `x`: `[batch, heads, seq, head_dim]`; `cos`, `sin`: `[batch, seq, rotary_dim]` fp32.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let head_dim = x.size()[3];
        let kind = x.kind();
        let cos = cos.unsqueeze(1).to_kind(kind);
        let sin = sin.unsqueeze(1).to_kind(kind);
        let rot = x.narrow(-1, 0, self.rotary_dim);
        let rotated = &rot * cos + rotate_half_interleaved(&rot) * sin;
        if self.rotary_dim == head_dim {
            rotated
        } else {
            let pass = x.narrow(-1, self.rotary_dim, head_dim - self.rotary_dim);
            Tensor::cat(&[rotated, pass], -1)
        }
    }
}

/// `(x0, x1, x2, x3, …) → (-x1, x0, -x3, x2, …)`.
pub fn rotate_half_interleaved(x: &Tensor) -> Tensor {
    let last = x.size().len() as i64 - 1;
    let dim = x.size()[last as usize];
    let even = x.slice(-1, 0, dim, 2);
    let odd = x.slice(-1, 1, dim, 2);
    Tensor::stack(&[-odd, even], -1).flatten(last, -1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised rotation equals the textbook per-pair rotation written as a loop.
    #[test]
    fn matches_per_pair_loop() {
        tch::manual_seed(0);
        let (b, h, t, d, rot) = (2, 3, 5, 8, 4);
        let rotary = Rotary::new(rot, 10000.0, Device::Cpu);
        let x = Tensor::randn([b, h, t, d], (Kind::Float, Device::Cpu));
        let pos = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 7, 3, 1, 1, 9]).view([b, t]);
        let (cos, sin) = rotary.cos_sin(&pos);
        let out = rotary.apply(&x, &cos, &sin);
        let xv: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
        let ov: Vec<f32> = Vec::try_from(out.flatten(0, -1)).unwrap();
        let posv: Vec<i64> = Vec::try_from(pos.flatten(0, -1)).unwrap();
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    let base = (((bi * h + hi) * t + ti) * d) as usize;
                    let p = posv[(bi * t + ti) as usize] as f64;
                    for i in 0..(rot / 2) as usize {
                        let angle = p / 10000f64.powf(2.0 * i as f64 / rot as f64);
                        let (x0, x1) = (xv[base + 2 * i] as f64, xv[base + 2 * i + 1] as f64);
                        let e0 = x0 * angle.cos() - x1 * angle.sin();
                        let e1 = x1 * angle.cos() + x0 * angle.sin();
                        assert!((ov[base + 2 * i] as f64 - e0).abs() < 1e-4);
                        assert!((ov[base + 2 * i + 1] as f64 - e1).abs() < 1e-4);
                    }
                    for j in rot as usize..d as usize {
                        assert_eq!(
                            ov[base + j],
                            xv[base + j],
                            "pass-through dims must be untouched"
                        );
                    }
                }
            }
        }
    }
}
