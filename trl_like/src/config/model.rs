//! `ModelConfig`: TRL 1.16's model and LoRA arguments.
//!
//! TRL 1.16 calls the dtype field `dtype` (default `float32`); the tutorial's
//! `torch_dtype` is accepted as an alias. `trust_remote_code` moved to
//! [`SFTConfig`](super::SFTConfig) in TRL 1.x and lives there.

use super::{
    check_at_least_one, check_finite, check_unit_interval, ConfigError, ConfigGroup, FieldSpec,
};

config_enum! {
    /// The dtype the weights are loaded in.
    pub enum TorchDtype {
        /// The dtype stored in the checkpoint's config (`torch_dtype`/`dtype` in config.json).
        Auto = "auto",
        Bfloat16 = "bfloat16",
        Float16 = "float16",
        Float32 = "float32",
    }
}

impl TorchDtype {
    /// A dtype name as transformers accepts it: one of [`CHOICES`](Self::CHOICES) or
    /// a short spelling found in checkpoints and scripts (`bf16`, `fp16`, `half`,
    /// `fp32`, `float`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "auto" => Self::Auto,
            "bfloat16" | "bf16" => Self::Bfloat16,
            "float16" | "fp16" | "half" => Self::Float16,
            "float32" | "fp32" | "float" => Self::Float32,
            _ => return None,
        })
    }

    /// The libtorch element type; `None` for `auto`, which the loader resolves
    /// (from the checkpoint, the device, ...).
    pub fn to_kind(self) -> Option<tch::Kind> {
        match self {
            Self::Auto => None,
            Self::Bfloat16 => Some(tch::Kind::BFloat16),
            Self::Float16 => Some(tch::Kind::Half),
            Self::Float32 => Some(tch::Kind::Float),
        }
    }

    /// The name `config.json` records for weights of `kind` (float32 for any kind
    /// other than bfloat16 and float16).
    pub fn from_kind(kind: tch::Kind) -> Self {
        match kind {
            tch::Kind::BFloat16 => Self::Bfloat16,
            tch::Kind::Half => Self::Float16,
            _ => Self::Float32,
        }
    }
}

config_enum! {
    /// 4-bit quantization data type (bitsandbytes).
    pub enum Bnb4bitQuantType {
        Fp4 = "fp4",
        Nf4 = "nf4",
    }
}

config_struct! {
    /// Which model to load and how to adapt it: TRL's `ModelConfig`.
    /// `Default` is TRL 1.16's defaults.
    pub struct ModelConfig {
        /// The checkpoint to start from: a local directory or a Hub model id.
        model_name_or_path: Option<String> = None,
        /// The Hub revision of the checkpoint: a branch, tag or commit id.
        model_revision: String = "main".to_string(),
        /// Load the weights in this dtype (auto: the checkpoint's own).
        #[alias = "torch_dtype"]
        dtype: TorchDtype = TorchDtype::Float32,
        /// The attention kernel: sdpa, eager (the same computation) or flash_attention_2 (CUDA only);
        /// all run scaled-dot-product attention here. Unset: sdpa.
        attn_implementation: Option<String> = None,
        /// Train LoRA adapters (PEFT) instead of all weights.
        use_peft: bool = false,
        /// LoRA rank r: the inner dimension of each adapter.
        lora_r: usize = 16,
        /// LoRA alpha: the adapter output is scaled by alpha / r (alpha / sqrt(r) with use_rslora).
        lora_alpha: usize = 32,
        /// Dropout on the adapter input while training.
        lora_dropout: f64 = 0.05,
        /// Module names (suffixes) that get adapters, e.g. q_proj k_proj v_proj, or "all-linear";
        /// unset uses the model type's default.
        lora_target_modules: Option<Vec<String>> = None,
        /// Modules trained in full next to the adapters (e.g. embed_tokens lm_head).
        lora_modules_to_save: Option<Vec<String>> = None,
        /// PEFT task type; CAUSAL_LM for language modeling.
        lora_task_type: String = "CAUSAL_LM".to_string(),
        /// Rank-stabilized LoRA: scale adapters by alpha / sqrt(r) instead of alpha / r.
        use_rslora: bool = false,
        /// DoRA: learn a magnitude vector next to the low-rank direction update (not supported yet).
        use_dora: bool = false,
        /// Load the base model quantized to 8 bits (bitsandbytes LLM.int8(); not supported here).
        load_in_8bit: bool = false,
        /// Load the base model's linear layers quantized to 4 bits as bitsandbytes does (QLoRA;
        /// needs use_peft). Computes in `dtype`; embedding and lm_head stay unquantized.
        load_in_4bit: bool = false,
        /// 4-bit quantization data type.
        bnb_4bit_quant_type: Bnb4bitQuantType = Bnb4bitQuantType::Nf4,
        /// Quantize the 4-bit quantization constants again (nested quantization).
        use_bnb_nested_quant: bool = false,
        /// Storage dtype of 4-bit weights (uint8, bfloat16, float16 or float32: the same
        /// packed bytes, kept as uint8 in memory).
        bnb_4bit_quant_storage: Option<String> = None,
    }
}

/// The `attn_implementation` values the models here honour. All of them run
/// libtorch's scaled-dot-product attention: `eager` computes the same function
/// (transformers' eager differs only in rounding), and `flash_attention_2` is
/// SDPA's flash kernel, which libtorch picks on CUDA for unmasked half-precision
/// batches (refused on the CPU, as transformers does).
pub const ATTN_IMPLEMENTATIONS: [&str; 3] = ["eager", "sdpa", "flash_attention_2"];

/// The `bnb_4bit_quant_storage` values accepted (torch dtypes the packed bytes may be viewed as).
pub const QUANT_STORAGES: [&str; 4] = ["uint8", "bfloat16", "float16", "float32"];

impl ModelConfig {
    /// `dtype`, under the tutorial's name.
    pub fn torch_dtype(&self) -> TorchDtype {
        self.dtype
    }

    /// The factor applied to the adapter output: `alpha / r`, or
    /// `alpha / sqrt(r)` with rsLoRA (PEFT's `scaling`).
    pub fn lora_scaling(&self) -> f64 {
        let r = self.lora_r.max(1) as f64;
        if self.use_rslora {
            self.lora_alpha as f64 / r.sqrt()
        } else {
            self.lora_alpha as f64 / r
        }
    }

    /// Whether `lora_target_modules` is PEFT's "all-linear" shorthand.
    pub fn targets_all_linear(&self) -> bool {
        matches!(self.lora_target_modules.as_deref(), Some([one]) if one.eq_ignore_ascii_case("all-linear"))
    }

    /// Checks ranges and rejects features this implementation lacks. The
    /// LoRA fields are checked even without `use_peft`, as a typo guard.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(m) = &self.model_name_or_path {
            if m.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "model_name_or_path",
                    "must not be empty",
                ));
            }
        }
        if let Some(a) = &self.attn_implementation {
            if !ATTN_IMPLEMENTATIONS.contains(&a.as_str()) {
                let known_elsewhere = a == "flash_attention_3"
                    || a == "flex_attention"
                    || a.starts_with("kernels-community/")
                    || a.starts_with("paged|");
                let message = format!(
                    "{a:?} {}; the valid values are {}",
                    if known_elsewhere {
                        "is a transformers kernel this implementation does not have"
                    } else {
                        "is not an attention implementation"
                    },
                    ATTN_IMPLEMENTATIONS.join(", ")
                );
                return Err(if known_elsewhere {
                    ConfigError::unsupported("attn_implementation", message)
                } else {
                    ConfigError::invalid("attn_implementation", message)
                });
            }
        }
        check_at_least_one("lora_r", self.lora_r)?;
        check_at_least_one("lora_alpha", self.lora_alpha)?;
        check_finite("lora_dropout", self.lora_dropout)?;
        check_unit_interval("lora_dropout", self.lora_dropout)?;
        if let Some(t) = &self.lora_target_modules {
            if t.is_empty() || t.iter().any(|m| m.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    "lora_target_modules",
                    "must name at least one module",
                ));
            }
            if t.len() > 1 && t.iter().any(|m| m.eq_ignore_ascii_case("all-linear")) {
                return Err(ConfigError::invalid(
                    "lora_target_modules",
                    "\"all-linear\" cannot be combined with module names",
                ));
            }
        }
        if self.lora_task_type != "CAUSAL_LM" {
            return Err(ConfigError::unsupported(
                "lora_task_type",
                format!("only CAUSAL_LM is supported, got {:?}", self.lora_task_type),
            ));
        }
        if self.load_in_8bit && self.load_in_4bit {
            return Err(ConfigError::conflict(
                "load_in_8bit",
                "load_in_4bit",
                "8-bit and 4-bit loading cannot be used together",
            ));
        }
        if self.load_in_8bit {
            return Err(ConfigError::unsupported(
                "load_in_8bit",
                "8-bit (bitsandbytes LLM.int8()) loading is not supported: its outlier \
                 decomposition is not reproduced here; use --load_in_4bit true (QLoRA) instead",
            ));
        }
        if self.load_in_4bit && !self.use_peft {
            return Err(ConfigError::conflict(
                "load_in_4bit",
                "use_peft",
                "4-bit weights cannot be fine-tuned directly (transformers refuses to train a \
                 quantized model); add --use_peft true to train LoRA adapters on the 4-bit base (QLoRA)",
            ));
        }
        if let Some(s) = &self.bnb_4bit_quant_storage {
            if !QUANT_STORAGES.contains(&s.as_str()) {
                return Err(ConfigError::invalid(
                    "bnb_4bit_quant_storage",
                    format!(
                        "{s:?} is not a storage dtype; the valid values are {}",
                        QUANT_STORAGES.join(", ")
                    ),
                ));
            }
        }
        if self.use_dora {
            return Err(ConfigError::unsupported(
                "use_dora",
                "use_dora is not supported yet; use plain LoRA",
            ));
        }
        Ok(())
    }

    /// TRL's `get_quantization_config` for 4 bits: `None` unless `load_in_4bit`.
    pub fn quantization_config(&self) -> Option<crate::quant::Quant4bitConfig> {
        self.load_in_4bit.then_some(crate::quant::Quant4bitConfig {
            quant_type: match self.bnb_4bit_quant_type {
                Bnb4bitQuantType::Nf4 => crate::quant::QuantType::Nf4,
                Bnb4bitQuantType::Fp4 => crate::quant::QuantType::Fp4,
            },
            nested: self.use_bnb_nested_quant,
        })
    }
}

impl ConfigGroup for ModelConfig {
    const NAME: &'static str = "ModelConfig";
    const TITLE: &'static str = "Model arguments (ModelConfig)";

    fn fields() -> &'static [FieldSpec] {
        Self::FIELDS
    }

    fn validate(&self) -> Result<(), ConfigError> {
        ModelConfig::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_trl_1_16() {
        let m = ModelConfig::default();
        assert_eq!(m.model_name_or_path, None);
        assert_eq!(m.model_revision, "main");
        assert_eq!(m.dtype, TorchDtype::Float32);
        assert_eq!((m.lora_r, m.lora_alpha, m.lora_dropout), (16, 32, 0.05));
        assert_eq!(m.lora_task_type, "CAUSAL_LM");
        assert!(!m.use_peft);
        assert_eq!(m.bnb_4bit_quant_type, Bnb4bitQuantType::Nf4);
        assert_eq!(m.validate(), Ok(()));
    }

    #[test]
    fn four_bit_needs_lora_and_maps_to_the_quantization_config() {
        let m = ModelConfig {
            load_in_4bit: true,
            ..Default::default()
        };
        let err = m.validate().unwrap_err();
        assert_eq!(err.field(), "load_in_4bit");
        assert!(err.to_string().contains("--use_peft true"), "{err}");
        let m = ModelConfig {
            load_in_4bit: true,
            use_peft: true,
            use_bnb_nested_quant: true,
            bnb_4bit_quant_storage: Some("bfloat16".into()),
            ..Default::default()
        };
        assert_eq!(m.validate(), Ok(()));
        assert_eq!(
            m.quantization_config(),
            Some(crate::quant::Quant4bitConfig {
                quant_type: crate::quant::QuantType::Nf4,
                nested: true
            })
        );
        let m = ModelConfig {
            bnb_4bit_quant_storage: Some("int4".into()),
            ..Default::default()
        };
        assert_eq!(m.validate().unwrap_err().field(), "bnb_4bit_quant_storage");
        assert_eq!(ModelConfig::default().quantization_config(), None);
    }

    #[test]
    fn scaling() {
        let m = ModelConfig {
            lora_r: 8,
            lora_alpha: 32,
            ..Default::default()
        };
        assert_eq!(m.lora_scaling(), 4.0);
        let m = ModelConfig {
            lora_r: 16,
            lora_alpha: 32,
            use_rslora: true,
            ..Default::default()
        };
        assert_eq!(m.lora_scaling(), 8.0);
    }

    #[test]
    fn unsupported_features_name_the_field() {
        for (m, field) in [
            (
                ModelConfig {
                    use_dora: true,
                    ..Default::default()
                },
                "use_dora",
            ),
            (
                ModelConfig {
                    load_in_8bit: true,
                    ..Default::default()
                },
                "load_in_8bit",
            ),
            (
                ModelConfig {
                    lora_r: 0,
                    ..Default::default()
                },
                "lora_r",
            ),
            (
                ModelConfig {
                    lora_dropout: 1.0,
                    ..Default::default()
                },
                "lora_dropout",
            ),
            (
                ModelConfig {
                    lora_target_modules: Some(vec![]),
                    ..Default::default()
                },
                "lora_target_modules",
            ),
        ] {
            assert_eq!(m.validate().unwrap_err().field(), field);
        }
        let e = ModelConfig {
            use_dora: true,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("not supported yet"), "{e}");
    }

    #[test]
    fn all_linear() {
        let m = ModelConfig {
            lora_target_modules: Some(vec!["all-linear".into()]),
            ..Default::default()
        };
        assert!(m.targets_all_linear());
        assert_eq!(m.validate(), Ok(()));
        let m = ModelConfig {
            lora_target_modules: Some(vec!["all-linear".into(), "q_proj".into()]),
            ..Default::default()
        };
        assert!(m.validate().is_err());
    }
}
