//! `DPOConfig`: TRL 1.16's `DPOConfig`, the shared [`TrainingArguments`]
//! (embedded flattened, reached through `Deref`) plus the preference-tuning
//! options. Names, defaults and help follow `trl/trainer/dpo_config.py`;
//! `learning_rate` defaults to 1e-6 as there.
//!
//! Settings TRL has but this trainer does not act on are still fields (a
//! YAML file written for TRL parses) and are refused by name when set.

use serde_json::{Map, Value};
use std::str::FromStr;

use super::{
    check_at_least_one, check_finite, ConfigError, ConfigGroup, FieldSpec, TrainingArguments,
    TruncationMode,
};

config_enum! {
    /// One term of the DPO loss (TRL's `loss_type` values).
    pub enum DPOLossType {
        /// The DPO paper's loss: `-log σ(β Δ)`.
        Sigmoid = "sigmoid",
        /// SLiC's hinge loss: `relu(1 - β Δ)`.
        Hinge = "hinge",
        /// IPO: `(Δ/len - 1/(2β))²` with length-normalised log ratios.
        Ipo = "ipo",
        /// EXO (pairwise), with `label_smoothing` as ε.
        ExoPair = "exo_pair",
        /// NCA (pairwise).
        NcaPair = "nca_pair",
        /// Robust DPO: sigmoid with `label_smoothing` as the label-flip rate.
        Robust = "robust",
        /// BCO (pairwise).
        BcoPair = "bco_pair",
        /// SPPO with hard win/lose probabilities.
        SppoHard = "sppo_hard",
        /// AOT (paired): sorted log-ratio differences across the batch.
        Aot = "aot",
        /// AOT (unpaired).
        AotUnpaired = "aot_unpaired",
        /// APO-zero: raise chosen, lower rejected likelihood.
        ApoZero = "apo_zero",
        /// APO-down: lower both, rejected more.
        ApoDown = "apo_down",
        /// DiscoPOP's log-ratio modulated loss (`discopop_tau`).
        Discopop = "discopop",
        /// Negative log-likelihood of the chosen completions (as in MPO).
        Sft = "sft",
        /// Sigmoid on length-normalised log ratios.
        SigmoidNorm = "sigmoid_norm",
    }
}

config_enum! {
    /// The f-divergence between policy and reference (f-DPO).
    pub enum FDivergenceType {
        ReverseKl = "reverse_kl",
        ForwardKl = "forward_kl",
        JsDivergence = "js_divergence",
        AlphaDivergence = "alpha_divergence",
    }
}

config_struct_flattened! {
    /// Training hyper-parameters for preference tuning: TRL's `DPOConfig`
    /// (the shared [`TrainingArguments`] plus DPO options). `Default` is TRL
    /// 1.16's defaults.
    pub struct DPOConfig {
        /// The shared training arguments (transformers' `TrainingArguments`).
        #[flatten]
        args: TrainingArguments = TrainingArguments::trl_defaults(1e-6),
        /// Keyword arguments for loading the model by name (Python-only; must stay unset here:
        /// use the ModelConfig fields).
        model_init_kwargs: Option<Map<String, Value>> = None,
        /// Allow model code shipped with a checkpoint to run (Python-only; must stay false here).
        trust_remote_code: bool = false,
        /// Weight of the load-balancing loss of Mixture-of-Experts models (none here: GLM-4 is dense).
        router_aux_loss_coef: Option<f64> = None,
        /// Turn dropout off in the trained model and in the reference (TRL's default).
        disable_dropout: bool = true,
        /// Processes for dataset preparation (must stay unset: preparation runs in one process here).
        dataset_num_proc: Option<usize> = None,
        /// Longest prompt + completion in tokens; longer ones are cut (see truncation_mode), and pairs
        /// whose prompt alone fills it are dropped; none: no limit.
        max_length: Option<usize> = Some(1024),
        /// Which end of a too-long sequence is kept (keep_end is deprecated in TRL).
        truncation_mode: TruncationMode = TruncationMode::KeepStart,
        /// Lay each batch's sequences back to back in one unpadded row (no compute spent on padding;
        /// the same results as padded batches).
        padding_free: bool = false,
        /// Pad batches to a multiple of this length; none (or "auto" off AWS Neuron) pads to the
        /// longest sequence.
        pad_to_multiple_of: Option<usize> = None,
        /// Compute the reference log-probabilities of the whole dataset before training, so no
        /// reference model is needed while training (with full fine-tuning: no frozen copy).
        precompute_ref_log_probs: bool = false,
        /// Batch size of that precomputation; none uses the per-device train / eval batch size.
        precompute_ref_batch_size: Option<usize> = None,
        /// The loss: one of sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
        /// aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, or several combined with
        /// loss_weights.
        loss_type: Vec<String> = vec!["sigmoid".to_string()],
        /// Weights of the loss_type terms (same length); none: 1.0 each.
        loss_weights: Option<Vec<f64>> = None,
        /// LD-DPO's weight of the completion tokens beyond the shorter completion's length (not
        /// implemented here; must stay unset).
        ld_alpha: Option<f64> = None,
        /// f-divergence regularizer: reverse_kl (standard DPO), forward_kl, js_divergence or
        /// alpha_divergence (only with losses built on the chosen-rejected score difference).
        f_divergence_type: FDivergenceType = FDivergenceType::ReverseKl,
        /// α of the alpha_divergence regularizer.
        f_alpha_divergence_coef: f64 = 0.5,
        /// Robust DPO's label-flip probability in [0, 0.5), EXO's ε (typical 1e-3), AOT's smoothing.
        label_smoothing: f64 = 0.0,
        /// Strength of the pull towards the reference model (> 0): higher keeps the policy closer;
        /// IPO's τ.
        beta: f64 = 0.1,
        /// WPO weighting of pairs by their length-normalised probability (not implemented here).
        use_weighting: bool = false,
        /// DiscoPOP's temperature τ.
        discopop_tau: f64 = 0.05,
        /// Offload activations to the CPU (not implemented here; use gradient_checkpointing).
        activation_offloading: bool = false,
        /// TR-DPO: mix the policy into the reference every ref_model_sync_steps (not implemented here).
        sync_ref_model: bool = false,
        /// TR-DPO's mixing weight α.
        ref_model_mixup_alpha: f64 = 0.6,
        /// TR-DPO's synchronisation interval in steps.
        ref_model_sync_steps: usize = 512,
        /// Deprecated in TRL: padding token; unset uses the tokenizer's pad token (or eos).
        pad_token: Option<String> = None,
    }
}

impl DPOConfig {
    /// `loss_type` as enum values (validated by [`DPOConfig::validate`]).
    pub fn loss_types(&self) -> Result<Vec<DPOLossType>, ConfigError> {
        self.loss_type
            .iter()
            .map(|s| {
                DPOLossType::from_str(s)
                    .map_err(|e| ConfigError::invalid("loss_type", e.to_string()))
            })
            .collect()
    }

    /// `loss_weights`, or 1.0 per loss term.
    pub fn resolved_loss_weights(&self) -> Vec<f64> {
        self.loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.loss_type.len()])
    }

    /// Checks ranges and combinations: the shared arguments first, then the
    /// DPO options; settings not implemented here are refused by name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.args.validate()?;
        self.validate_unsupported()?;
        self.validate_loss()?;
        if let Some(n) = self.max_length {
            if n < 2 {
                return Err(ConfigError::invalid(
                    "max_length",
                    format!("must be at least 2 (a prompt token and a completion token), got {n}"),
                ));
            }
        }
        if let Some(n) = self.pad_to_multiple_of {
            check_at_least_one("pad_to_multiple_of", n)?;
        }
        if let Some(n) = self.precompute_ref_batch_size {
            check_at_least_one("precompute_ref_batch_size", n)?;
        }
        Ok(())
    }

    fn validate_unsupported(&self) -> Result<(), ConfigError> {
        let refused: [(&'static str, bool, &str); 8] = [
            (
                "model_init_kwargs",
                self.model_init_kwargs.as_ref().is_some_and(|m| !m.is_empty()),
                "Python loading options have no meaning here; use the ModelConfig fields (dtype, …)",
            ),
            (
                "trust_remote_code",
                self.trust_remote_code,
                "remote (Python) model code cannot run here; models are implemented in Rust",
            ),
            (
                "router_aux_loss_coef",
                self.router_aux_loss_coef.is_some(),
                "only for Mixture-of-Experts models; GLM-4 is dense — remove it",
            ),
            (
                "dataset_num_proc",
                self.dataset_num_proc.is_some_and(|n| n > 1),
                "dataset preparation runs in one process here — remove it",
            ),
            (
                "ld_alpha",
                self.ld_alpha.is_some(),
                "LD-DPO length weighting is not implemented yet — remove it",
            ),
            (
                "use_weighting",
                self.use_weighting,
                "WPO weighting is not implemented yet — set it to false",
            ),
            (
                "activation_offloading",
                self.activation_offloading,
                "not implemented; gradient_checkpointing saves activation memory instead",
            ),
            (
                "sync_ref_model",
                self.sync_ref_model,
                "TR-DPO reference synchronisation is not implemented yet — set it to false",
            ),
        ];
        match refused.into_iter().find(|(_, on, _)| *on) {
            Some((field, _, why)) => Err(ConfigError::unsupported(field, why)),
            None => Ok(()),
        }
    }

    fn validate_loss(&self) -> Result<(), ConfigError> {
        check_finite("beta", self.beta)?;
        if self.beta <= 0.0 {
            return Err(ConfigError::invalid(
                "beta",
                format!(
                    "must be > 0 (it scales the log-probability ratios; TRL's default is 0.1), got {}",
                    self.beta
                ),
            ));
        }
        if self.loss_type.is_empty() {
            return Err(ConfigError::invalid(
                "loss_type",
                "must name at least one loss (e.g. sigmoid)",
            ));
        }
        let types = self.loss_types()?;
        if let Some(w) = &self.loss_weights {
            if w.len() != types.len() {
                return Err(ConfigError::conflict(
                    "loss_weights",
                    "loss_type",
                    format!(
                        "must have one weight per loss type: {} weights for {} loss types",
                        w.len(),
                        types.len()
                    ),
                ));
            }
        }
        for (name, v) in [
            ("label_smoothing", self.label_smoothing),
            ("f_alpha_divergence_coef", self.f_alpha_divergence_coef),
            ("discopop_tau", self.discopop_tau),
        ] {
            check_finite(name, v)?;
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return Err(ConfigError::invalid(
                "label_smoothing",
                format!("must be in [0, 1], got {}", self.label_smoothing),
            ));
        }
        if types.contains(&DPOLossType::Robust) && self.label_smoothing >= 0.5 {
            return Err(ConfigError::invalid(
                "label_smoothing",
                format!(
                    "must be in [0, 0.5) for the robust loss (it is a label-flip probability), got {}",
                    self.label_smoothing
                ),
            ));
        }
        if types.contains(&DPOLossType::ExoPair) && self.label_smoothing <= 0.0 {
            return Err(ConfigError::invalid(
                "label_smoothing",
                "must be > 0 for exo_pair (it is EXO's ε; the paper uses 1e-3)",
            ));
        }
        if self.f_divergence_type != FDivergenceType::ReverseKl {
            use DPOLossType::*;
            if let Some(t) = types.iter().find(|t| {
                !matches!(
                    t,
                    Sigmoid | SigmoidNorm | Hinge | Ipo | ExoPair | Robust | Discopop | Sft
                )
            }) {
                return Err(ConfigError::conflict(
                    "f_divergence_type",
                    "loss_type",
                    format!(
                        "{} has no f-divergence generalization; use reverse_kl with it",
                        t
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl ConfigGroup for DPOConfig {
    const NAME: &'static str = "DPOConfig";
    const TITLE: &'static str = "Training arguments (DPOConfig)";

    fn fields() -> &'static [FieldSpec] {
        Self::FIELDS
    }

    fn validate(&self) -> Result<(), ConfigError> {
        DPOConfig::validate(self)
    }

    fn preprocess(field: &str, value: Value) -> Value {
        super::training_args::trl_preprocess(field, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_trl_1_16() {
        // Checked with `DPOConfig(output_dir=..., use_cpu=True)` from trl 1.16 / transformers 5.23.
        let c = DPOConfig::default();
        assert_eq!(c.learning_rate, 1e-6);
        assert_eq!(c.logging_steps, 10.0);
        assert!(c.gradient_checkpointing && c.use_bf16());
        assert_eq!(c.beta, 0.1);
        assert_eq!(c.loss_type, ["sigmoid"]);
        assert_eq!(c.resolved_loss_weights(), [1.0]);
        assert_eq!(c.max_length, Some(1024));
        assert_eq!(c.truncation_mode, TruncationMode::KeepStart);
        assert!(c.disable_dropout && !c.precompute_ref_log_probs && !c.padding_free);
        assert_eq!(c.f_divergence_type, FDivergenceType::ReverseKl);
        assert_eq!(
            (c.label_smoothing, c.discopop_tau, c.ref_model_sync_steps),
            (0.0, 0.05, 512)
        );
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn beta_must_be_positive() {
        for beta in [0.0, -0.1] {
            let c = DPOConfig {
                beta,
                ..Default::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.field(), "beta");
            assert!(e.to_string().contains("> 0"), "{e}");
        }
    }

    #[test]
    fn loss_types_and_weights() {
        let c = DPOConfig {
            loss_type: vec!["sigmoid".into(), "sft".into()],
            loss_weights: Some(vec![0.8]),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), "loss_weights");
        let c = DPOConfig {
            loss_weights: Some(vec![0.8, 0.2]),
            ..c
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.loss_types().unwrap(),
            [DPOLossType::Sigmoid, DPOLossType::Sft]
        );
        let c = DPOConfig {
            loss_type: vec!["sigmod".into()],
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("loss_type") && e.contains("sigmoid"), "{e}");
        let c = DPOConfig {
            loss_type: vec!["robust".into()],
            label_smoothing: 0.5,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), "label_smoothing");
        let c = DPOConfig {
            loss_type: vec!["apo_zero".into()],
            f_divergence_type: FDivergenceType::ForwardKl,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), "f_divergence_type");
    }

    #[test]
    fn unimplemented_settings_are_refused_by_name() {
        let cases: [(&str, DPOConfig); 5] = [
            (
                "ld_alpha",
                DPOConfig {
                    ld_alpha: Some(0.5),
                    ..Default::default()
                },
            ),
            (
                "use_weighting",
                DPOConfig {
                    use_weighting: true,
                    ..Default::default()
                },
            ),
            (
                "sync_ref_model",
                DPOConfig {
                    sync_ref_model: true,
                    ..Default::default()
                },
            ),
            (
                "trust_remote_code",
                DPOConfig {
                    trust_remote_code: true,
                    ..Default::default()
                },
            ),
            (
                "router_aux_loss_coef",
                DPOConfig {
                    router_aux_loss_coef: Some(0.001),
                    ..Default::default()
                },
            ),
        ];
        for (field, c) in cases {
            let e = c.validate().unwrap_err();
            assert!(matches!(e, ConfigError::Unsupported { .. }), "{e}");
            assert_eq!(e.field(), field);
        }
    }
}
