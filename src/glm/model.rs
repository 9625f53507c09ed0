//! `GlmModel` (embeddings, decoder stack, final norm) and `GlmForCausalLM`
//! (plus the untied `lm_head`), with HF parameter names so checkpoints load as
//! they are: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, …

use super::attention::build_mask;
use super::attention::{AttentionMask, Positions};
use super::decoder_layer::DecoderLayer;
use super::loading::{load_safetensors, save_safetensors, LoadError, MAX_SHARD_BYTES};
use super::rms_norm::RmsNorm;
use super::rotary::Rotary;
use super::GlmConfig;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};
use trl_like::config::TorchDtype;
use trl_like::modeling::{CausalLM, CausalLMInput, Checkpointable, KvCache, PreTrainedModel};
use trl_like::nn::{with_4bit_linears, Linear, LinearWeight};
use trl_like::peft::LoraModel;
use trl_like::quant::{Packed4bit, Quant4bitConfig, QuantType};

#[derive(Debug)]
pub struct GlmModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    rotary: Rotary,
}

impl GlmModel {
    pub fn new(path: nn::Path, cfg: &GlmConfig) -> Self {
        let embed_tokens = (&path / "embed_tokens").var(
            "weight",
            &[cfg.vocab_size, cfg.hidden_size],
            nn::Init::Const(0.0),
        );
        let layers = (0..cfg.num_hidden_layers as usize)
            .map(|i| DecoderLayer::new(&path / "layers" / i, cfg, i))
            .collect();
        Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(&path / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            rotary: Rotary::new(cfg.rotary_dim(), cfg.rope_theta(), path.device()),
        }
    }

    /// # Shapes
    /// see [`CausalLM::forward_hidden`].
    pub fn forward(
        &self,
        input: &CausalLMInput,
        mut cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let device = self.embed_tokens.device();
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let mut hidden = Tensor::embedding(
            &self.embed_tokens,
            &input.input_ids.to_device(device),
            -1,
            false,
            false,
        );
        let ctx = self.layer_context(input, past, cache.is_some());
        for layer in &self.layers {
            hidden = layer.forward(
                &hidden,
                &ctx.positions(&self.rotary),
                cache.as_deref_mut(),
                train,
            );
        }
        self.norm.forward(&hidden)
    }

    /// Rotary tables and attention mask for `input`, which follows `past` cached
    /// positions; `cached` tells packed segments that a KV cache is in use.
    fn layer_context(&self, input: &CausalLMInput, past: i64, cached: bool) -> GlmLayerContext {
        let device = self.embed_tokens.device();
        let (batch, seq) = input
            .input_ids
            .size2()
            .expect("input_ids must be [batch, seq]");
        let position_ids = match input.position_ids {
            Some(p) => p.to_device(device),
            None => (Tensor::arange(seq, (Kind::Int64, device)) + past)
                .unsqueeze(0)
                .expand([batch, seq], false),
        };
        let (cos, sin) = self.rotary.cos_sin(&position_ids);
        let mask = match input.seq_lens {
            Some(lens) => AttentionMask::segments(lens, batch, seq, cached),
            None => {
                let padding = input.attention_mask.map(|m| m.to_device(device));
                build_mask(padding.as_ref(), past, seq, device)
            }
        };
        GlmLayerContext { cos, sin, mask }
    }
}

/// GLM-4 with its language-model head. One implementation serves both
/// architectures: `config.model_type` "glm" (GLM-4-9B) or "glm4" (GLM-4-0414,
/// whose layers add two norms), as transformers' Glm4 reuses Glm's modules.
#[derive(Debug)]
pub struct GlmForCausalLM {
    pub config: GlmConfig,
    pub model: GlmModel,
    pub lm_head: Linear,
    /// Owns every base weight; trainers keep adapters in a store of their own.
    pub vs: nn::VarStore,
    /// The directory the weights came from (empty for random init).
    pub name_or_path: String,
    /// Recompute layer activations in training passes (gradient checkpointing).
    pub activation_checkpointing: bool,
    /// How the decoder's linear layers are quantized (QLoRA); `None`: dense.
    pub quantization: Option<Quant4bitConfig>,
}

/// GLM-4-0414 (`model_type: "glm4"`): same type, chosen by the config.
pub type Glm4ForCausalLM = GlmForCausalLM;

impl GlmForCausalLM {
    /// Allocates the model in `kind` on `device` (weights zero; load or init them next).
    pub fn new(config: GlmConfig, device: Device, kind: Kind) -> Self {
        Self::new_quantized(config, device, kind, None)
    }

    /// [`new`](Self::new) with the decoder's linear layers as 4-bit storage when `quant`
    /// is set (transformers + bitsandbytes: every `nn.Linear` but `lm_head`; the embedding
    /// and the norms stay in `kind`, which is also the compute dtype).
    pub fn new_quantized(
        config: GlmConfig,
        device: Device,
        kind: Kind,
        quant: Option<Quant4bitConfig>,
    ) -> Self {
        let mut vs = nn::VarStore::new(device);
        // Set on the empty store so variables are created in `kind` directly:
        // a 9B model never exists in fp32 first.
        vs.set_kind(kind);
        let root = vs.root();
        let model = with_4bit_linears(quant, || GlmModel::new(&root / "model", &config));
        let lm_head = Linear::new(
            &root / "lm_head",
            config.hidden_size,
            config.vocab_size,
            false,
        );
        Self {
            config,
            model,
            lm_head,
            vs,
            name_or_path: String::new(),
            activation_checkpointing: false,
            quantization: quant,
        }
    }

    /// Loads `config.json` and the safetensors weights (single file or sharded) of a
    /// transformers checkpoint directory. `kind` = `None` uses the checkpoint's dtype.
    pub fn from_pretrained(
        dir: impl AsRef<Path>,
        kind: Option<Kind>,
        device: Device,
    ) -> Result<Self, LoadError> {
        Self::from_pretrained_quantized(dir, kind, device, None)
    }

    /// [`from_pretrained`](Self::from_pretrained) with `--load_in_4bit`: the linear weights
    /// are quantized tensor by tensor as the shards are read. A checkpoint saved already
    /// quantized (config.json `quantization_config`) loads its codes as they are, with or
    /// without `quant`, as transformers does.
    pub fn from_pretrained_quantized(
        dir: impl AsRef<Path>,
        kind: Option<Kind>,
        device: Device,
        quant: Option<Quant4bitConfig>,
    ) -> Result<Self, LoadError> {
        let dir = dir.as_ref();
        let config = GlmConfig::from_pretrained(dir)?;
        let quant = match saved_quantization(&config, dir)? {
            Some(saved) => {
                if quant.is_some_and(|q| q != saved) {
                    log::warn!(
                        "{}: the checkpoint is already quantized ({}{}); its quantization is used",
                        dir.display(),
                        saved.quant_type,
                        if saved.nested { ", nested" } else { "" }
                    );
                }
                Some(saved)
            }
            None => quant,
        };
        let kind = match kind {
            Some(k) => k,
            None => config
                .checkpoint_dtype()
                .and_then(TorchDtype::to_kind)
                .unwrap_or(Kind::Float),
        };
        let mut model = Self::new_quantized(config, device, kind, quant);
        load_safetensors(&model.vs, dir)?;
        model.name_or_path = dir.display().to_string();
        model.vs.freeze_base();
        model.fuse_frozen_projections();
        Ok(model)
    }

    /// Random weights (normal, `initializer_range`; norms at 1), for benchmarks of
    /// real shapes without a download.
    pub fn init_random(&self, seed: i64) {
        tch::manual_seed(seed);
        let std = self.config.initializer_range;
        let _guard = tch::no_grad_guard();
        // In name order: `variables()` is a HashMap, whose order changes from
        // process to process, and so would the weights each draw lands in.
        let mut vars: Vec<(String, tch::Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let layers = self.linear_layers();
        for (name, mut var) in vars {
            if let Some(q) = name
                .strip_suffix(".weight")
                .and_then(|m| layers.get(m))
                .and_then(|l| match &l.weight {
                    trl_like::nn::LinearWeight::Quant4bit(q) => Some(q),
                    _ => None,
                })
            {
                // The draw a dense model would make, quantized at once: one layer is
                // dense at a time, never the model.
                let w = Tensor::empty(q.state.shape.as_slice(), (self.vs.kind(), self.vs.device()))
                    .normal_(0.0, std);
                let fresh = Packed4bit::quantize(&w, q.config()).expect("float weights quantize");
                q.copy_from(&fresh).expect("same shapes");
                continue;
            }
            if trl_like::quant::is_state_key(&name) {
                continue;
            }
            if name.ends_with("norm.weight") {
                let _ = var.fill_(1.0);
            } else if name.ends_with(".bias") {
                let _ = var.zero_();
            } else {
                let _ = var.normal_(0.0, std);
            }
        }
    }

    /// Every linear layer by module name (`model.layers.0.self_attn.q_proj`, …, `lm_head`).
    pub fn linear_layers(&self) -> std::collections::BTreeMap<String, &Linear> {
        let mut out = std::collections::BTreeMap::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let attn = &layer.self_attn;
            for (name, lin) in [
                ("q_proj", &attn.q_proj),
                ("k_proj", &attn.k_proj),
                ("v_proj", &attn.v_proj),
                ("o_proj", &attn.o_proj),
            ] {
                out.insert(format!("model.layers.{i}.self_attn.{name}"), lin);
            }
            out.insert(
                format!("model.layers.{i}.mlp.gate_up_proj"),
                &layer.mlp.gate_up_proj,
            );
            out.insert(
                format!("model.layers.{i}.mlp.down_proj"),
                &layer.mlp.down_proj,
            );
        }
        out.insert("lm_head".to_string(), &self.lm_head);
        out
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }
}

/// The 4-bit configuration of a checkpoint transformers saved quantized (config.json
/// `quantization_config`), `None` for a plain one. What this loader cannot reproduce is
/// refused by name.
fn saved_quantization(
    config: &GlmConfig,
    dir: &Path,
) -> Result<Option<Quant4bitConfig>, LoadError> {
    let Some(q) = config.extra.get("quantization_config") else {
        return Ok(None);
    };
    let path = dir.join("config.json").display().to_string();
    let refuse = |message: String| LoadError::File {
        path: path.clone(),
        message: format!("quantization_config: {message}"),
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(refuse(format!(
            "quant_method {method:?} is not supported; only bitsandbytes 4-bit checkpoints load here"
        )));
    }
    let flag = |name: &str| q.get(name).and_then(|v| v.as_bool()).unwrap_or(false);
    if flag("load_in_8bit") {
        return Err(refuse(
            "8-bit (LLM.int8()) checkpoints are not supported; use a 4-bit or an unquantized one"
                .into(),
        ));
    }
    if !flag("load_in_4bit") {
        return Err(refuse(
            "neither load_in_4bit nor load_in_8bit is set".into(),
        ));
    }
    if let Some(skip) = q.get("llm_int8_skip_modules").and_then(|v| v.as_array()) {
        if skip.iter().any(|m| m.as_str() != Some("lm_head")) {
            return Err(refuse(format!(
                "llm_int8_skip_modules {skip:?}: only lm_head may stay unquantized here"
            )));
        }
    }
    let quant_type = q
        .get("bnb_4bit_quant_type")
        .and_then(|v| v.as_str())
        .unwrap_or("fp4");
    let quant_type = QuantType::parse(quant_type).ok_or_else(|| {
        refuse(format!(
            "bnb_4bit_quant_type {quant_type:?} is not nf4 or fp4"
        ))
    })?;
    Ok(Some(Quant4bitConfig {
        quant_type,
        nested: flag("bnb_4bit_use_double_quant"),
    }))
}

/// Extension on the base store: generation and adapter training never need
/// gradients of the base weights.
trait FreezeBase {
    fn freeze_base(&self);
}

impl FreezeBase for nn::VarStore {
    fn freeze_base(&self) {
        for (_, var) in self.variables() {
            let _ = var.set_requires_grad(false);
        }
    }
}

impl CausalLM for GlmForCausalLM {
    fn forward_hidden(
        &self,
        input: &CausalLMInput,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        self.model.forward(input, cache, train)
    }

    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden)
    }

    fn lm_head_weight(&self) -> Option<Tensor> {
        let head = &self.lm_head;
        match &head.weight {
            LinearWeight::Dense(w) if head.bias.is_none() && head.lora.is_none() => {
                Some(w.shallow_clone())
            }
            _ => None,
        }
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    fn dtype(&self) -> Kind {
        self.vs.kind()
    }
}

impl PreTrainedModel for GlmForCausalLM {
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        // A 4-bit weight's quantization state is no parameter (torch keeps it beside the
        // packed `Params4bit`).
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(name, _)| !trl_like::quant::is_state_key(name))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn save_pretrained(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut config = serde_json::to_value(&self.config).map_err(std::io::Error::other)?;
        // Record the dtype the weights are saved in, under both spellings.
        let dtype = TorchDtype::from_kind(self.vs.kind()).as_str();
        config["torch_dtype"] = dtype.into();
        config["dtype"] = dtype.into();
        // 4-bit layers are written dequantized in the model dtype (a plain checkpoint, what
        // `glm4 merge` of a QLoRA run produces), so the config loses its quantization.
        if let Some(obj) = config.as_object_mut() {
            obj.remove("quantization_config");
        }
        let text = serde_json::to_string_pretty(&config)? + "\n";
        trl_like::fsutil::write_atomic(&dir.join("config.json"), text.as_bytes())?;
        let layers = self.linear_layers();
        let named: Vec<(String, Tensor)> = self
            .named_parameters()
            .into_iter()
            .map(
                |(name, t)| match name.strip_suffix(".weight").and_then(|m| layers.get(m)) {
                    Some(linear) => (name, linear.dense_weight(self.vs.kind())),
                    None => (name, t),
                },
            )
            .collect();
        save_safetensors(&named, dir, MAX_SHARD_BYTES)
    }

    fn name_or_path(&self) -> String {
        self.name_or_path.clone()
    }

    fn is_quantized(&self) -> bool {
        self.quantization.is_some()
    }
}

/// Rotary tables and the attention mask, shared by every layer of one forward pass.
pub struct GlmLayerContext {
    cos: Tensor,
    sin: Tensor,
    mask: AttentionMask,
}

impl GlmLayerContext {
    fn positions<'a>(&'a self, rotary: &'a Rotary) -> Positions<'a> {
        Positions {
            rotary,
            cos: &self.cos,
            sin: &self.sin,
            mask: &self.mask,
        }
    }
}

impl Checkpointable for GlmForCausalLM {
    type LayerContext = GlmLayerContext;

    fn embed(&self, input_ids: &Tensor) -> Tensor {
        let w = &self.model.embed_tokens;
        Tensor::embedding(w, &input_ids.to_device(w.device()), -1, false, false)
    }

    fn layer_context(&self, input: &CausalLMInput) -> GlmLayerContext {
        self.model.layer_context(input, 0, false)
    }

    fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    fn layer_forward(
        &self,
        index: usize,
        hidden: &Tensor,
        ctx: &GlmLayerContext,
        train: bool,
    ) -> Tensor {
        self.model.layers[index].forward(hidden, &ctx.positions(&self.model.rotary), None, train)
    }

    fn final_norm(&self, hidden: &Tensor) -> Tensor {
        self.model.norm.forward(hidden)
    }

    fn activation_checkpointing(&self) -> bool {
        self.activation_checkpointing
    }

    fn set_activation_checkpointing(&mut self, on: bool) {
        self.activation_checkpointing = on;
    }
}

impl LoraModel for GlmForCausalLM {
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let attn = &mut layer.self_attn;
            for (name, lin) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                out.push((format!("model.layers.{i}.self_attn.{name}"), lin));
            }
            out.push((
                format!("model.layers.{i}.mlp.gate_up_proj"),
                &mut layer.mlp.gate_up_proj,
            ));
            out.push((
                format!("model.layers.{i}.mlp.down_proj"),
                &mut layer.mlp.down_proj,
            ));
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// q/k/v of every layer as one GEMM when their weights are frozen.
    fn fuse_frozen_projections(&mut self) {
        for layer in &mut self.model.layers {
            layer.self_attn.fuse_frozen_qkv();
        }
    }
}
