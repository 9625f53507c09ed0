//! `config.json` of GLM-4 checkpoints: transformers' `GlmConfig` (`model_type: "glm"`,
//! THUDM/glm-4-9b-hf) and `Glm4Config` (`model_type: "glm4"`, GLM-4-0414).

use serde::{Deserialize, Serialize};
use std::path::Path;

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
pub struct GlmConfig {
    /// "glm" (GLM-4-9B) or "glm4" (GLM-4-0414: two extra norms per layer).
    pub model_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    #[serde(default = "d::vocab_size")]
    pub vocab_size: i64,
    #[serde(default = "d::hidden_size")]
    pub hidden_size: i64,
    #[serde(default = "d::intermediate_size")]
    pub intermediate_size: i64,
    #[serde(default = "d::num_hidden_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d::num_attention_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d::num_key_value_heads")]
    pub num_key_value_heads: i64,
    /// Fraction of each head that is rotated (0.5 for GLM-4: 64 of 128 dims).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default = "d::head_dim")]
    pub head_dim: i64,
    #[serde(default = "d::hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "d::max_position_embeddings")]
    pub max_position_embeddings: i64,
    #[serde(default = "d::initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "d::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d::yes")]
    pub use_cache: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// transformers 4.x spelling; transformers 5 writes `rope_parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    #[serde(default = "d::yes")]
    pub attention_bias: bool,
    /// The dtype the weights were saved in, as transformers 4 spells it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// The same, as transformers 5 spells it (either or both may be present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformers_version: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

mod d {
    pub fn vocab_size() -> i64 {
        151552
    }
    pub fn hidden_size() -> i64 {
        4096
    }
    pub fn intermediate_size() -> i64 {
        13696
    }
    pub fn num_hidden_layers() -> i64 {
        40
    }
    pub fn num_attention_heads() -> i64 {
        32
    }
    pub fn num_key_value_heads() -> i64 {
        2
    }
    pub fn head_dim() -> i64 {
        128
    }
    pub fn hidden_act() -> String {
        "silu".into()
    }
    pub fn max_position_embeddings() -> i64 {
        131072
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
    pub fn rms_norm_eps() -> f64 {
        1.5625e-07
    }
    pub fn yes() -> bool {
        true
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
        serde_json::from_value(serde_json::json!({
            "model_type": "glm",
            "architectures": ["GlmForCausalLM"],
            "partial_rotary_factor": 0.5,
            "rope_theta": 10000.0,
            "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338],
            "torch_dtype": "bfloat16",
        }))
        .expect("built-in config is valid")
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

    /// The checkpoint's dtype name (`dtype`, else `torch_dtype`).
    pub fn checkpoint_dtype(&self) -> Option<&str> {
        self.dtype.as_deref().or(self.torch_dtype.as_deref())
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
