//! Building blocks a model shares with the trainer: a `Linear` layer that can
//! carry a LoRA adapter (PEFT's `LoraLayer` wrapping `nn.Linear`), with a dense or a
//! bitsandbytes 4-bit weight (transformers' `Linear4bit`, QLoRA's frozen base).

use crate::quant::{Packed4bit, Quant4bitConfig};
use std::cell::Cell;
use tch::{nn, Kind, Tensor};

/// Where a [`Linear`] keeps its weight.
#[derive(Debug)]
pub enum LinearWeight {
    /// `[out, in]` in the model dtype.
    Dense(Tensor),
    /// 4-bit codes and quantization state, registered in the model's store under
    /// transformers' keys (`weight`, `weight.absmax`, …); frozen.
    Quant4bit(Packed4bit),
}

thread_local! {
    /// Set inside [`with_adapters_disabled`]: every LoRA layer passes the base
    /// output through unchanged.
    static ADAPTERS_DISABLED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every LoRA adapter switched off (PEFT's `disable_adapter()`
/// context): the model computes as its frozen base, without a second copy of
/// the weights in memory — DPO's reference model for a new adapter. The
/// switch is per thread and restored even if `f` panics.
pub fn with_adapters_disabled<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ADAPTERS_DISABLED.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(ADAPTERS_DISABLED.with(|d| d.replace(true)));
    f()
}

/// A dense layer `y = x Wᵀ + b` with HF parameter names (`weight` `[out, in]`,
/// optional `bias` `[out]`), plus an optional LoRA adapter added to its output.
#[derive(Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraLayer>,
}

thread_local! {
    static BUILD_4BIT: Cell<Option<Quant4bitConfig>> = const { Cell::new(None) };
}

/// Runs `build` with every [`Linear::new`] on this thread allocating 4-bit storage per
/// `cfg` instead of a dense weight (`None`: dense, as usual). A model quantizes exactly
/// the linear layers it builds inside — transformers' `replace_with_bnb_linear` — without
/// its modules knowing, and a 9B model is never allocated dense.
pub fn with_4bit_linears<R>(cfg: Option<Quant4bitConfig>, build: impl FnOnce() -> R) -> R {
    struct Restore(Option<Quant4bitConfig>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUILD_4BIT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(BUILD_4BIT.with(|c| c.replace(cfg)));
    build()
}

impl Linear {
    /// Creates `weight` (and `bias` when asked) under `path`, zero-filled: values
    /// come from a checkpoint or an explicit initialisation. Inside
    /// [`with_4bit_linears`] the weight is 4-bit storage, to be quantized into.
    pub fn new(path: nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let weight = match BUILD_4BIT.with(Cell::get) {
            None => LinearWeight::Dense(path.var(
                "weight",
                &[out_features, in_features],
                nn::Init::Const(0.0),
            )),
            Some(cfg) => {
                let q = Packed4bit::empty(
                    &[out_features, in_features],
                    cfg,
                    path.kind(),
                    path.device(),
                );
                let state = &path / "weight";
                for (suffix, t) in q.tensors() {
                    if suffix.is_empty() {
                        let _ = path.add("weight", t.shallow_clone(), false);
                    } else {
                        let _ = state.add(suffix, t.shallow_clone(), false);
                    }
                }
                LinearWeight::Quant4bit(q)
            }
        };
        let bias = bias.then(|| path.var("bias", &[out_features], nn::Init::Const(0.0)));
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    fn shape(&self) -> Vec<i64> {
        match &self.weight {
            LinearWeight::Dense(w) => w.size(),
            LinearWeight::Quant4bit(q) => q.state.shape.clone(),
        }
    }

    pub fn in_features(&self) -> i64 {
        self.shape()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.shape()[0]
    }

    /// The weight as a dense `[out, in]` tensor in `kind`: the variable itself when it
    /// is dense and already `kind`, otherwise a new tensor (a 4-bit weight is
    /// dequantized, fp32 math rounded once to `kind`, as bitsandbytes does).
    pub fn dense_weight(&self, kind: Kind) -> Tensor {
        match &self.weight {
            LinearWeight::Dense(w) if w.kind() == kind => w.shallow_clone(),
            LinearWeight::Dense(w) => w.to_kind(kind),
            LinearWeight::Quant4bit(q) => q.dequantize(kind),
        }
    }

    /// # Shapes
    /// `x`: `[..., in]` → `[..., out]` in `x`'s dtype.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let base = match &self.weight {
            LinearWeight::Dense(w) => x.linear(w, self.bias.as_ref()),
            // bitsandbytes' training path: dequantize to the compute dtype just in time
            // and run a plain GEMM; no dense copy outlives the call except what autograd
            // keeps for the input gradient (the codes have no gradient).
            LinearWeight::Quant4bit(q) => x.linear(&q.dequantize(x.kind()), self.bias.as_ref()),
        };
        match &self.lora {
            None => base,
            Some(lora) => lora.add_to(&base, x, train),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_t(x, false)
    }
}

/// One adapter on one linear layer.
///
/// # Shapes
/// `lora_a`: `[r, in]`, `lora_b`: `[out, r]` (both fp32 by default).
#[derive(Debug)]
pub struct LoraLayer {
    pub lora_a: Tensor,
    pub lora_b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraLayer {
    /// `base + scaling · B(A(dropout(x)))`, computed in the adapter dtype and cast
    /// back to the base output's dtype (PEFT casts the input to the adapter dtype,
    /// adds, and returns the base result dtype).
    pub fn add_to(&self, base: &Tensor, x: &Tensor, train: bool) -> Tensor {
        self.add_to_cast(base, &x.to_kind(self.lora_a.kind()), train)
    }

    /// [`add_to`](Self::add_to) with `x` already in the adapter dtype
    /// ([`input_kind`](Self::input_kind)): adapters sharing one input cast it
    /// once. Each still draws its own dropout mask, as PEFT does.
    pub fn add_to_cast(&self, base: &Tensor, x: &Tensor, train: bool) -> Tensor {
        if ADAPTERS_DISABLED.with(Cell::get) {
            return base.shallow_clone();
        }
        let x = if train && self.dropout > 0.0 {
            crate::data::unpad::dropout(x, self.dropout)
        } else {
            x.shallow_clone()
        };
        let delta = x
            .linear::<Tensor>(&self.lora_a, None)
            .linear::<Tensor>(&self.lora_b, None)
            * self.scaling;
        (base + delta).to_kind(base.kind())
    }

    /// The dtype the adapter computes in (its input is cast to it).
    pub fn input_kind(&self) -> tch::Kind {
        self.lora_a.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn adapters_switch_off_inside_with_adapters_disabled_only() {
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([3, 4], opts);
        let linear = Linear {
            weight: LinearWeight::Dense(w.shallow_clone()),
            bias: None,
            lora: Some(LoraLayer {
                lora_a: Tensor::randn([2, 4], opts),
                lora_b: Tensor::randn([3, 2], opts),
                scaling: 2.0,
                dropout: 0.0,
            }),
        };
        let x = Tensor::randn([5, 4], opts);
        let base = x.linear(&w, None::<&Tensor>);
        let with = linear.forward(&x);
        assert!(!with.allclose(&base, 1e-6, 1e-6, false));
        let off = with_adapters_disabled(|| linear.forward(&x));
        assert!(off.equal(&base));
        // Restored afterwards, also after a panic inside.
        assert!(linear.forward(&x).equal(&with));
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_adapters_disabled(|| panic!("inside"))
        }));
        assert!(linear.forward(&x).equal(&with));
    }
}
