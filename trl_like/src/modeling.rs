//! The contract between the trainer / generation code and a model.
//!
//! `trl_like` never names a concrete architecture: the GLM-4 model in the
//! application crate implements [`CausalLM`], and everything here (generation,
//! and later the SFT trainer) works through it — the way TRL works with any
//! `AutoModelForCausalLM`.

use tch::{Device, Kind, Tensor};

/// Key/value cache for incremental decoding (transformers' `DynamicCache`).
///
/// One `(key, value)` pair per decoder layer, each `[batch, kv_heads, seq, head_dim]`,
/// grown along the sequence dimension as tokens are decoded.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of positions already cached (0 for an empty cache).
    pub fn seq_len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    /// Appends this step's keys/values for `layer` and returns the full cached ones.
    ///
    /// # Shapes
    /// `key`, `value`: `[batch, kv_heads, new_seq, head_dim]`; returns
    /// `[batch, kv_heads, past_seq + new_seq, head_dim]` each.
    pub fn update(&mut self, layer: usize, key: Tensor, value: Tensor) -> (Tensor, Tensor) {
        let slot = &mut self.layers[layer];
        let merged = match slot.take() {
            None => (key, value),
            Some((k, v)) => (Tensor::cat(&[k, key], 2), Tensor::cat(&[v, value], 2)),
        };
        *slot = Some((merged.0.shallow_clone(), merged.1.shallow_clone()));
        merged
    }

    /// Keeps only the batch rows in `index` (used when sequences are dropped from a batch).
    pub fn select_rows(&mut self, index: &Tensor) {
        for slot in self.layers.iter_mut().flatten() {
            slot.0 = slot.0.index_select(0, index);
            slot.1 = slot.1.index_select(0, index);
        }
    }
}

/// Inputs of one forward pass, as transformers' `model(input_ids, attention_mask, position_ids)`.
pub struct CausalLMInput<'a> {
    /// `[batch, seq]`, int64.
    pub input_ids: &'a Tensor,
    /// `[batch, past_seq + seq]`, 1 for real tokens and 0 for padding; `None` = no padding.
    pub attention_mask: Option<&'a Tensor>,
    /// `[batch, seq]`, int64; `None` = `past_seq..past_seq+seq` for every row
    /// (what transformers uses when none are given).
    pub position_ids: Option<&'a Tensor>,
    /// Padding-free batches (TRL's `padding_free`, packing): `input_ids` is one
    /// row `[1, total]` holding several sequences back to back, of these lengths
    /// (summing to `total`). Each token attends only to earlier tokens of its own
    /// sequence; `position_ids` normally restart at 0 for each. `None` = every
    /// row is one sequence. Only for a forward pass without a KV cache; a padding
    /// mask is not used with it (such a row has no padding).
    pub seq_lens: Option<&'a [i64]>,
}

/// A decoder-only language model: the `AutoModelForCausalLM` of this crate.
pub trait CausalLM {
    /// Final hidden states after the last norm.
    ///
    /// # Shapes
    /// returns `[batch, seq, hidden]` in the model's compute dtype.
    fn forward_hidden(
        &self,
        input: &CausalLMInput,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor;

    /// Projects hidden states to vocabulary logits (`lm_head`).
    ///
    /// # Shapes
    /// `hidden`: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    fn lm_head(&self, hidden: &Tensor) -> Tensor;

    /// The `[vocab, hidden]` matrix when `lm_head` is exactly `hidden @ Wᵀ`
    /// (no bias, no adapter), for the fused loss ([`crate::ops::fused_lm_loss`]);
    /// `None` (the default) keeps the loss on [`CausalLM::lm_head`].
    fn lm_head_weight(&self) -> Option<Tensor> {
        None
    }

    /// Logits for every position: `lm_head(forward_hidden(..))`.
    fn forward(&self, input: &CausalLMInput, cache: Option<&mut KvCache>, train: bool) -> Tensor {
        let hidden = self.forward_hidden(input, cache, train);
        self.lm_head(&hidden)
    }

    /// An empty cache sized for this model.
    fn new_cache(&self) -> KvCache;

    /// Device the weights live on.
    fn device(&self) -> Device;

    /// Dtype activations are computed in (the dtype of the base weights).
    fn dtype(&self) -> Kind;
}

/// A causal LM the trainer can fine-tune: forward passes, adapters on its
/// linear layers, its base weights by HF name, and saving in HF format
/// (transformers' `PreTrainedModel`).
pub trait PreTrainedModel: CausalLM + crate::peft::LoraModel + Checkpointable {
    /// Base weights by HF parameter name (`model.layers.0.self_attn.q_proj.weight`, …).
    fn named_parameters(&self) -> Vec<(String, Tensor)>;

    /// Writes `config.json` and the weights as safetensors (sharded with an
    /// index when large), the layout `from_pretrained` of transformers reads.
    fn save_pretrained(&self, dir: &std::path::Path) -> std::io::Result<()>;

    /// Where the model came from (recorded as `base_model_name_or_path` in adapters).
    fn name_or_path(&self) -> String;

    /// Whether base weights are quantized (transformers' `is_loaded_in_4bit`): such a base
    /// trains through adapters only, which TRL keeps in bf16.
    fn is_quantized(&self) -> bool {
        false
    }
}

/// Layer-by-layer access to a model, for activation recompute (gradient
/// checkpointing, torchtune's `set_activation_checkpointing`): with it on, a
/// training pass runs the stack without keeping activations and recomputes
/// one layer at a time during the backward pass ([`Checkpointable::forward_for_loss`]).
pub trait Checkpointable: CausalLM {
    /// What every layer needs besides the hidden states (rotary tables, mask).
    type LayerContext;
    /// Token embeddings. # Shapes `[batch, seq]` → `[batch, seq, hidden]`.
    fn embed(&self, input_ids: &Tensor) -> Tensor;
    /// The per-forward context for `input` (no KV cache).
    fn layer_context(&self, input: &CausalLMInput) -> Self::LayerContext;
    fn num_layers(&self) -> usize;
    /// Decoder layer `index`. # Shapes `[batch, seq, hidden]` → same.
    fn layer_forward(
        &self,
        index: usize,
        hidden: &Tensor,
        ctx: &Self::LayerContext,
        train: bool,
    ) -> Tensor;
    /// The norm after the last layer.
    fn final_norm(&self, hidden: &Tensor) -> Tensor;

    /// Whether training passes recompute activations instead of keeping them.
    fn activation_checkpointing(&self) -> bool;
    /// Turns activation recompute on or off (transformers' `gradient_checkpointing_enable`).
    fn set_activation_checkpointing(&mut self, on: bool);

    /// Runs the model on `input` and hands the final hidden states (after the
    /// last norm, `[batch, seq, hidden]`) to `head`, which computes the loss
    /// and, when `backward`, backpropagates it into them; the gradients then
    /// reach every trainable weight. Without `backward` nothing keeps a graph.
    ///
    /// With [`activation_checkpointing`](Self::activation_checkpointing) and
    /// `backward`, only each layer's input is kept: the layers are recomputed
    /// one at a time, last to first, with the dropout masks of the first pass.
    fn forward_for_loss<R>(
        &self,
        input: &CausalLMInput,
        train: bool,
        backward: bool,
        head: impl FnOnce(&Tensor) -> R,
    ) -> R
    where
        Self: Sized,
    {
        if !(backward && self.activation_checkpointing()) {
            let hidden = if backward {
                self.forward_hidden(input, None, train)
            } else {
                tch::no_grad(|| self.forward_hidden(input, None, train))
            };
            return head(&hidden);
        }
        recompute_layers(self, input, train, head)
    }
}

/// The recompute pass of [`Checkpointable::forward_for_loss`].
fn recompute_layers<M: Checkpointable, R>(
    model: &M,
    input: &CausalLMInput,
    train: bool,
    head: impl FnOnce(&Tensor) -> R,
) -> R {
    let step_seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
    let ctx = model.layer_context(input);
    let mut inputs = Vec::with_capacity(model.num_layers());
    let last = tch::no_grad(|| {
        let mut h = model.embed(input.input_ids);
        for i in 0..model.num_layers() {
            inputs.push(h.shallow_clone());
            // The same dropout masks in this pass and in the recompute.
            tch::manual_seed(step_seed.wrapping_add(i as i64));
            h = model.layer_forward(i, &h, &ctx, train);
        }
        h
    });
    let last = last.detach().set_requires_grad(true);
    let normed = model.final_norm(&last);
    let out = head(&normed);
    let mut grad = last.grad();
    for i in (0..model.num_layers()).rev() {
        let x = inputs[i].detach().set_requires_grad(true);
        tch::manual_seed(step_seed.wrapping_add(i as i64));
        let y = model.layer_forward(i, &x, &ctx, train);
        (y * &grad).sum(Kind::Float).backward();
        grad = x.grad();
        inputs[i] = Tensor::new();
    }
    // Full fine-tuning also trains the embedding matrix.
    let embedded = model.embed(input.input_ids);
    if embedded.requires_grad() {
        (embedded * &grad).sum(Kind::Float).backward();
    }
    out
}
