//! Building blocks a model shares with the trainer: a `Linear` layer that can
//! carry a LoRA adapter (PEFT's `LoraLayer` wrapping `nn.Linear`).

use std::cell::Cell;
use tch::{nn, Tensor};

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
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraLayer>,
}

impl Linear {
    /// Creates `weight` (and `bias` when asked) under `path`, zero-filled: values
    /// come from a checkpoint or an explicit initialisation.
    pub fn new(path: nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let weight = path.var("weight", &[out_features, in_features], nn::Init::Const(0.0));
        let bias = bias.then(|| path.var("bias", &[out_features], nn::Init::Const(0.0)));
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// # Shapes
    /// `x`: `[..., in]` → `[..., out]` in `x`'s dtype.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let base = x.linear(&self.weight, self.bias.as_ref());
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
        if ADAPTERS_DISABLED.with(Cell::get) {
            return base.shallow_clone();
        }
        let x = x.to_kind(self.lora_a.kind());
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x
        };
        let delta = x
            .linear::<Tensor>(&self.lora_a, None)
            .linear::<Tensor>(&self.lora_b, None)
            * self.scaling;
        (base + delta).to_kind(base.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn adapters_switch_off_inside_with_adapters_disabled_only() {
        let opts = (Kind::Float, Device::Cpu);
        let linear = Linear {
            weight: Tensor::randn([3, 4], opts),
            bias: None,
            lora: Some(LoraLayer {
                lora_a: Tensor::randn([2, 4], opts),
                lora_b: Tensor::randn([3, 2], opts),
                scaling: 2.0,
                dropout: 0.0,
            }),
        };
        let x = Tensor::randn([5, 4], opts);
        let base = x.linear(&linear.weight, None::<&Tensor>);
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
