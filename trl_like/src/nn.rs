//! Building blocks a model shares with the trainer: a `Linear` layer that can
//! carry a LoRA adapter (PEFT's `LoraLayer` wrapping `nn.Linear`).

use tch::{nn, Tensor};

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
        self.add_to_cast(base, &x.to_kind(self.lora_a.kind()), train)
    }

    /// [`add_to`](Self::add_to) with `x` already in the adapter dtype
    /// ([`input_kind`](Self::input_kind)): adapters sharing one input cast it
    /// once. Each still draws its own dropout mask, as PEFT does.
    pub fn add_to_cast(&self, base: &Tensor, x: &Tensor, train: bool) -> Tensor {
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
