//! `SFTConfig`: TRL 1.16's `SFTConfig`, the shared [`TrainingArguments`]
//! (embedded flattened: one YAML key / flag per field, reached through
//! `Deref`) plus the SFT options.
//!
//! Defaults are TRL's (which differ from plain `TrainingArguments` in a few
//! places: `learning_rate` 2e-5 instead of 5e-5, `logging_steps` 10 instead of
//! 500, `gradient_checkpointing` on, `bf16` on unless `fp16` is set).

use serde_json::Value;

use super::{check_at_least_one, ConfigError, ConfigGroup, FieldSpec, TrainingArguments};

config_enum! {
    /// Which end of a too-long sequence survives truncation.
    pub enum TruncationMode {
        KeepStart = "keep_start",
        /// Deprecated in TRL 1.16.
        KeepEnd = "keep_end",
    }
}

impl Default for TruncationMode {
    /// TRL's default.
    fn default() -> Self {
        Self::KeepStart
    }
}

config_enum! {
    /// How sequences are packed into `max_length` blocks when `packing` is on.
    pub enum PackingStrategy {
        /// Best-fit decreasing; a sequence longer than a block is truncated.
        Bfd = "bfd",
        /// Best-fit decreasing; a sequence longer than a block is split.
        BfdSplit = "bfd_split",
        /// Concatenate everything and cut every `max_length` tokens.
        Wrapped = "wrapped",
    }
}

config_enum! {
    /// The training loss (TRL's `loss_type`).
    pub enum LossType {
        /// Token-level negative log-likelihood (cross-entropy).
        Nll = "nll",
        /// Dynamic Fine-Tuning: NLL weighted by the detached token probability.
        Dft = "dft",
        /// NLL computed over chunks of the sequence to bound the logits' memory.
        ChunkedNll = "chunked_nll",
    }
}
config_struct_flattened! {
    /// Training hyper-parameters: TRL's `SFTConfig` (the shared
    /// [`TrainingArguments`] plus SFT options). `Default` is TRL 1.16's defaults.
    pub struct SFTConfig {
        /// The shared training arguments (transformers' `TrainingArguments`).
        #[flatten]
        args: TrainingArguments = TrainingArguments::trl_defaults(2e-5),
        /// Allow model code shipped with a checkpoint to run (Python-only; must stay false here).
        trust_remote_code: bool = false,
        /// A chat template to use instead of the tokenizer's: a tokenizer directory or a Jinja file.
        chat_template_path: Option<String> = None,
        /// The dataset column with the text of language-modeling (non-conversational) samples.
        dataset_text_field: String = "text".to_string(),
        /// End-of-sequence token appended to each sample; unset uses the tokenizer's eos token.
        eos_token: Option<String> = None,
        /// Deprecated in TRL: padding token; unset uses the tokenizer's pad token (or eos).
        pad_token: Option<String> = None,
        /// Longest tokenized sample (at least 2); longer ones are truncated (see truncation_mode), and
        /// samples left without a token with loss are dropped; none: no limit.
        /// Also the block length when packing.
        #[alias = "max_seq_length"]
        max_length: Option<usize> = Some(1024),
        /// Which end of a too-long sample is kept.
        truncation_mode: TruncationMode = TruncationMode::KeepStart,
        /// Shuffle the training set once while preparing it.
        shuffle_dataset: bool = false,
        /// Pack several samples into each max_length block (less padding); with bfd or bfd_split the
        /// batches are padding-free too, and attention stays within each sample.
        packing: bool = false,
        /// How packing fills blocks.
        packing_strategy: PackingStrategy = PackingStrategy::Bfd,
        /// Lay each batch's samples back to back in one unpadded row: positions restart and attention
        /// stays within each sample (no compute spent on padding).
        padding_free: bool = false,
        /// glm4 extension (not in TRL): compute padded batches on their real tokens only, laid back
        /// to back with the positions and attention they have in the padded batch; losses, metrics
        /// and gradients equal dense padded compute (float rounding aside), and num_tokens and
        /// total_flos still count the padded batch. false: dense padded compute, for debugging.
        unpad_batches: bool = true,
        /// Pad batches to a multiple of this length; none (or "auto" off AWS Neuron) pads to the
        /// longest sample.
        pad_to_multiple_of: Option<usize> = None,
        /// Pack the evaluation set too; unset follows packing.
        eval_packing: Option<bool> = None,
        /// Loss only on completion tokens (prompt-completion data); unset: on for such data.
        completion_only_loss: Option<bool> = None,
        /// Loss only on assistant turns of conversations.
        assistant_only_loss: bool = false,
        /// The training loss: nll, dft, or chunked_nll.
        loss_type: LossType = LossType::Nll,
    }
}

impl SFTConfig {
    /// `max_length`, under its old name.
    pub fn max_seq_length(&self) -> Option<usize> {
        self.max_length
    }

    /// Whether batches are collated padding-free (one row, positions restarting
    /// per sequence): `padding_free`, or `packing` with a bfd strategy, which
    /// implies it in TRL (sft_trainer.py: `args.padding_free or (args.packing and
    /// args.packing_strategy in {"bfd", "bfd_split"})`).
    pub fn uses_padding_free(&self) -> bool {
        self.padding_free
            || (self.packing
                && matches!(
                    self.packing_strategy,
                    PackingStrategy::Bfd | PackingStrategy::BfdSplit
                ))
    }

    /// Checks ranges and combinations: the shared arguments first, then the
    /// SFT options. The error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.args.validate()?;
        self.validate_data()
    }

    /// Remote code, and the dataset / length settings (packing needs a block length).
    fn validate_data(&self) -> Result<(), ConfigError> {
        if self.trust_remote_code {
            return Err(ConfigError::unsupported(
                "trust_remote_code",
                "remote (Python) model code cannot run here; models are implemented in Rust",
            ));
        }
        if self.dataset_text_field.is_empty() {
            return Err(ConfigError::invalid(
                "dataset_text_field",
                "must not be empty",
            ));
        }
        if let Some(n) = self.max_length {
            // TRL accepts 1 and then trains on nothing: one token leaves none to predict.
            if n < 2 {
                return Err(ConfigError::invalid(
                    "max_length",
                    format!("must be at least 2 (one token to read, one to predict), got {n}"),
                ));
            }
        }
        if let Some(n) = self.pad_to_multiple_of {
            check_at_least_one("pad_to_multiple_of", n)?;
        }
        let packs_eval = self.eval_packing.unwrap_or(self.packing);
        if (self.packing || packs_eval) && self.max_length.is_none() {
            // TRL: "When packing is enabled, `max_length` can't be `None`."
            return Err(ConfigError::invalid(
                "max_length",
                "must be set when packing (or eval_packing) is on: it is the length of the packed blocks",
            ));
        }
        Ok(())
    }
}

impl ConfigGroup for SFTConfig {
    const NAME: &'static str = "SFTConfig";
    const TITLE: &'static str = "Training arguments (SFTConfig)";

    fn fields() -> &'static [FieldSpec] {
        Self::FIELDS
    }

    fn validate(&self) -> Result<(), ConfigError> {
        SFTConfig::validate(self)
    }

    fn preprocess(field: &str, value: Value) -> Value {
        super::training_args::trl_preprocess(field, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IntervalStrategy, OptimizerName, SaveStrategy, SchedulerType};

    #[test]
    fn defaults_are_trl_1_16() {
        // Checked with `SFTConfig(output_dir=..., use_cpu=True)` from trl 1.16 / transformers 5.23.
        let c = SFTConfig::default();
        assert_eq!(c.output_dir, "trainer_output");
        assert_eq!(c.learning_rate, 2e-5);
        assert_eq!(c.logging_steps, 10.0);
        assert_eq!(c.save_steps, 500.0);
        assert_eq!(c.max_length, Some(1024));
        assert!(c.gradient_checkpointing);
        assert_eq!(c.bf16, None);
        assert!(c.use_bf16());
        assert_eq!(c.lr_scheduler_type, SchedulerType::Linear);
        assert_eq!(c.save_strategy, SaveStrategy::Steps);
        assert_eq!(c.eval_strategy, IntervalStrategy::No);
        assert_eq!(c.optim, OptimizerName::AdamwTorchFused);
        assert!(c.report_to.is_empty());
        assert_eq!(
            (c.seed, c.max_steps, c.per_device_train_batch_size),
            (42, -1, 8)
        );
        assert_eq!(c.validate(), Ok(()));
        // The shared arguments keep transformers' defaults underneath.
        assert_eq!(TrainingArguments::default().learning_rate, 5e-5);
        assert_eq!(TrainingArguments::default().logging_steps, 500.0);
    }

    #[test]
    fn packing_needs_max_length_and_bfd_implies_padding_free() {
        let c = SFTConfig {
            packing: true,
            max_length: None,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("max_length") && e.contains("packing"), "{e}");
        let c = SFTConfig {
            packing: true,
            ..Default::default()
        };
        assert!(c.uses_padding_free());
        let c = SFTConfig {
            packing: true,
            packing_strategy: PackingStrategy::Wrapped,
            ..Default::default()
        };
        assert!(!c.uses_padding_free());
        assert!(SFTConfig {
            padding_free: true,
            ..Default::default()
        }
        .uses_padding_free());
    }
}
