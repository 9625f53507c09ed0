//! `config.json` of GLM-4 checkpoints: transformers' `GlmConfig` (`model_type: "glm"`,
//! THUDM/glm-4-9b-hf) and `Glm4Config` (`model_type: "glm4"`, GLM-4-0414).

use serde::{Deserialize, Serialize};
use std::path::Path;
use trl_like::config::TorchDtype;

/// Rotary settings as transformers 5 writes them (`rope_parameters`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

fn default_rope_type() -> String {
    "default".into()
}

/// Either one token id or a list of them (`eos_token_id` is a list for GLM-4).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            TokenIds::One(x) => vec![*x],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// Every field of transformers' `GlmConfig` / `Glm4Config`, with their defaults
/// (the GLM-4-9B values). Unknown keys are kept in `extra` so a config round-trips.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GlmConfig {
    /// "glm" (GLM-4-9B) or "glm4" (GLM-4-0414: two extra norms per layer).
    /// Required in a file: a missing one reads as "" and fails validation.
    #[serde(default)]
    pub model_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    /// Fraction of each head that is rotated (0.5 for GLM-4: 64 of 128 dims).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    pub head_dim: i64,
    pub hidden_act: String,
    pub attention_dropout: f64,
    pub max_position_embeddings: i64,
    pub initializer_range: f64,
    pub rms_norm_eps: f64,
    pub use_cache: bool,
    pub tie_word_embeddings: bool,
    /// transformers 4.x spelling; transformers 5 writes `rope_parameters`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    pub attention_bias: bool,
    /// The dtype the weights were saved in, as transformers 4 spells it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// The same, as transformers 5 spells it (either or both may be present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for GlmConfig {
    /// transformers' `GlmConfig()` defaults, which are GLM-4-9B's shape.
    fn default() -> Self {
        Self {
            model_type: "glm".into(),
            architectures: None,
            vocab_size: 151552,
            hidden_size: 4096,
            intermediate_size: 13696,
            num_hidden_layers: 40,
            num_attention_heads: 32,
            num_key_value_heads: 2,
            partial_rotary_factor: None,
            head_dim: 128,
            hidden_act: "silu".into(),
            attention_dropout: 0.0,
            max_position_embeddings: 131072,
            initializer_range: 0.02,
            rms_norm_eps: 1.5625e-07,
            use_cache: true,
            tie_word_embeddings: false,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            pad_token_id: None,
            eos_token_id: None,
            bos_token_id: None,
            attention_bias: true,
            torch_dtype: None,
            dtype: None,
            transformers_version: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: invalid config.json: {error}")]
    Parse {
        path: String,
        error: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl GlmConfig {
    /// The GLM-4-9B shape (THUDM/glm-4-9b-hf), for benchmarks without weights.
    pub fn glm4_9b() -> Self {
        Self {
            architectures: Some(vec!["GlmForCausalLM".into()]),
            partial_rotary_factor: Some(0.5),
            rope_theta: Some(10000.0),
            pad_token_id: Some(151329),
            eos_token_id: Some(TokenIds::Many(vec![151329, 151336, 151338])),
            torch_dtype: Some("bfloat16".into()),
            ..Self::default()
        }
    }

    /// Reads and validates `dir/config.json` (or a path to a JSON file).
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Io {
            path: shown.clone(),
            error: source,
        })?;
        let config: GlmConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
                path: shown.clone(),
                error: source,
            })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.model_type.is_empty() {
            return Err(
                "model_type is missing (expected \"glm\" or \"glm4\"): is this a GLM-4 checkpoint's config.json?"
                    .into(),
            );
        }
        if self.model_type != "glm" && self.model_type != "glm4" {
            return Err(format!(
                "model_type {:?} is not a GLM-4 architecture (expected \"glm\" or \"glm4\")",
                self.model_type
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (GLM-4 uses \"silu\")",
                self.hidden_act
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if value <= 0 {
                return Err(format!("{name} must be positive, got {value}"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        let rot = self.rotary_dim();
        if rot % 2 != 0 || rot > self.head_dim || rot <= 0 {
            return Err(format!(
                "partial_rotary_factor gives an invalid rotary dim {rot} for head_dim {}",
                self.head_dim
            ));
        }
        if let Some(rp) = &self.rope_parameters {
            if rp.rope_type != "default" {
                return Err(format!(
                    "rope_type {:?} is not supported (only \"default\")",
                    rp.rope_type
                ));
            }
        }
        Ok(())
    }

    /// GLM-4-0414 layers carry `post_self_attn_layernorm` and `post_mlp_layernorm`.
    pub fn has_post_norms(&self) -> bool {
        self.model_type == "glm4"
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    pub fn partial_rotary_factor(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.partial_rotary_factor)
            .or(self.partial_rotary_factor)
            .unwrap_or(0.5)
    }

    /// Number of leading head dims that are rotated: `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self) -> i64 {
        (self.head_dim as f64 * self.partial_rotary_factor()) as i64
    }

    /// The checkpoint's dtype (`dtype`, else `torch_dtype`); `None` when unset or
    /// not a name transformers knows.
    pub fn checkpoint_dtype(&self) -> Option<TorchDtype> {
        self.dtype
            .as_deref()
            .or(self.torch_dtype.as_deref())
            .and_then(TorchDtype::from_name)
    }

    pub fn eos_token_ids(&self) -> Vec<i64> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Parameter count, for MFU and memory estimates.
    pub fn num_parameters(&self) -> i64 {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let norms = if self.has_post_norms() { 4 * h } else { 2 * h };
        let layer = h * (q + 2 * kv) + bias + q * h + h * 2 * i + i * h + norms;
        v * h * 2 + self.num_hidden_layers * layer + h
    }
}
