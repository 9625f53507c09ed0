//! Frozen linear layers that share an input, run as one GEMM.
//!
//! With a frozen base (LoRA), attention's q/k/v projections are three GEMMs on
//! the same input; for GLM-4-9B two of them are thin (256 of 4,608 output
//! columns), which keeps a GPU poorly used at small batches. [`FusedLinears`]
//! moves their weights (and biases) into one buffer `[Σ out, in]` and makes
//! each layer's weight a view of its slice: no extra memory, and everything
//! that reads or writes the weights by name — `named_parameters`,
//! `save_pretrained`, loading, `merge_and_unload`'s in-place update — sees and
//! changes exactly the tensors it did before, so the buffer itself is never
//! saved and never goes stale. The forward runs one GEMM on the buffer, splits
//! the output, and adds each layer's adapter to its slice, casting the shared
//! input to the adapter dtype once instead of once per adapter (each adapter
//! still draws its own dropout mask, in layer order, as PEFT does).
//!
//! A layer whose weight no longer is its slice (replaced since packing, e.g.
//! by another dtype or a quantized store) or that needs a gradient (full
//! fine-tuning) makes the forward fall back to the layers one by one: the
//! fused path is a cache, never a second source of truth.

use crate::nn::{Linear, LinearWeight};
use tch::{Kind, Tensor};

/// One buffer behind the weights of several frozen [`Linear`]s.
#[derive(Debug)]
pub struct FusedLinears {
    /// `[Σ out, in]`; each layer's weight is a view of its rows.
    weight: Tensor,
    /// `[Σ out]` when every layer has a bias.
    bias: Option<Tensor>,
    /// Output features of each layer, in order.
    outs: Vec<i64>,
}

/// The weight of `linear` when it is a plain dense tensor that may be fused.
/// (A quantized or otherwise packed weight is not: return `None` for it.)
fn dense_weight(linear: &Linear) -> Option<&Tensor> {
    match &linear.weight {
        LinearWeight::Dense(w) => Some(w),
        LinearWeight::Quant4bit(_) => None,
    }
}

fn addr(t: &Tensor) -> usize {
    t.data_ptr() as usize
}

impl FusedLinears {
    /// Moves the weights (and biases) of `linears` into one buffer and makes
    /// each a view of it. `None`, changing nothing, unless every layer has a
    /// frozen dense weight of one dtype, device and input size, and all or
    /// none have a frozen bias.
    pub fn pack(linears: &mut [&mut Linear]) -> Option<Self> {
        let first = dense_weight(linears.first()?)?;
        let (kind, device, inputs) = (first.kind(), first.device(), first.size().get(1).copied()?);
        let with_bias = linears[0].bias.is_some();
        for l in linears.iter() {
            let w = dense_weight(l)?;
            let ok_weight = w.dim() == 2
                && w.size()[1] == inputs
                && w.kind() == kind
                && w.device() == device
                && !w.requires_grad();
            let ok_bias = match &l.bias {
                Some(b) => with_bias && b.kind() == kind && !b.requires_grad(),
                None => !with_bias,
            };
            if !(ok_weight && ok_bias) {
                return None;
            }
        }
        let weights: Vec<Tensor> = linears
            .iter()
            .filter_map(|l| dense_weight(l).map(Tensor::shallow_clone))
            .collect();
        let outs: Vec<i64> = weights.iter().map(|w| w.size()[0]).collect();
        tch::no_grad(|| {
            let weight = Tensor::cat(&weights, 0);
            drop(weights);
            let bias = with_bias.then(|| {
                let biases: Vec<&Tensor> = linears.iter().filter_map(|l| l.bias.as_ref()).collect();
                Tensor::cat(&biases, 0)
            });
            let mut start = 0;
            for (l, &out) in linears.iter_mut().zip(&outs) {
                if let LinearWeight::Dense(w) = &mut l.weight {
                    w.set_data(&weight.narrow(0, start, out));
                }
                if let (Some(b), Some(all)) = (l.bias.as_mut(), bias.as_ref()) {
                    b.set_data(&all.narrow(0, start, out));
                }
                start += out;
            }
            Some(Self { weight, bias, outs })
        })
    }

    /// Whether `linears` still are the frozen views of this buffer.
    pub fn is_current(&self, linears: &[&Linear]) -> bool {
        if linears.len() != self.outs.len() {
            return false;
        }
        let row_bytes = self.weight.size()[1] as usize * self.weight.kind().elt_size_in_bytes();
        let elt = self.weight.kind().elt_size_in_bytes();
        let mut start = 0usize;
        for (l, &out) in linears.iter().zip(&self.outs) {
            let Some(w) = dense_weight(l) else {
                return false;
            };
            let weight_ok = w.size() == [out, self.weight.size()[1]]
                && w.kind() == self.weight.kind()
                && !w.requires_grad()
                && addr(w) == addr(&self.weight) + start * row_bytes;
            let bias_ok = match (&l.bias, &self.bias) {
                (None, None) => true,
                (Some(b), Some(all)) => {
                    !b.requires_grad()
                        && b.kind() == all.kind()
                        && addr(b) == addr(all) + start * elt
                }
                _ => false,
            };
            if !(weight_ok && bias_ok) {
                return false;
            }
            start += out as usize;
        }
        true
    }

    /// The outputs of `linears` on `x`, as [`Linear::forward_t`] computes each,
    /// from one GEMM; `None` when they are no longer this buffer's views (then
    /// run them one by one).
    ///
    /// # Shapes
    /// `x`: `[..., in]` → one `[..., out_i]` per layer.
    pub fn forward_t(&self, linears: &[&Linear], x: &Tensor, train: bool) -> Option<Vec<Tensor>> {
        if !self.is_current(linears) {
            return None;
        }
        let base = x.linear(&self.weight, self.bias.as_ref());
        let parts = base.split_with_sizes(self.outs.as_slice(), -1);
        // One cast of the shared input per adapter dtype (fp32 adapters on a bf16 base).
        let mut cast: Option<(Kind, Tensor)> = None;
        let outputs = parts
            .into_iter()
            .zip(linears)
            .map(|(part, l)| match &l.lora {
                None => part,
                Some(lora) => {
                    let kind = lora.input_kind();
                    if cast.as_ref().is_none_or(|(k, _)| *k != kind) {
                        cast = Some((kind, x.to_kind(kind)));
                    }
                    let (_, xk) = cast.as_ref().expect("cast above");
                    lora.add_to_cast(&part, xk, train)
                }
            })
            .collect();
        Some(outputs)
    }
}
