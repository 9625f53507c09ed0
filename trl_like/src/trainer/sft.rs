//! TRL's `SFTTrainer`: dataset preparation (format, chat template, eos,
//! tokenize, truncate, pack), TRL's collators, and the causal-LM loss with
//! its entropy and token accuracy — the hooks of the shared [`Trainer`].

use super::hooks::{LossOutput, TrainingHooks};
use super::loss::{chunked_lm_loss, LOSS_CHUNK_TOKENS};
use super::{prepare_and_pack, Trainer, TrainerCallback, TrainerError};
use crate::config::SFTConfig;
use crate::data::tokenize::{
    apply_sft_tokenizer_args, collator_pad_token_id, drop_examples_without_loss, tokenize_example,
};
use crate::data::unpad::{unpad, with_padded_rows};
use crate::data::{
    collate_with, formats, Batch, Dataset, DatasetFormat, Example, TokenizeOptions,
    TokenizedExample,
};
use crate::modeling::{CausalLMInput, PreTrainedModel};
use crate::peft::{LoraConfig, PeftAdapter};
use crate::tokenizer::PreTrainedTokenizer;
use serde_json::Value;
use tch::{Device, Kind};

/// Turns a raw record into the text to train on (the tutorial's `formatting_func`).
pub type FormattingFunc = Box<dyn Fn(&Value) -> Result<String, FormattingError>>;

/// Why a [`FormattingFunc`] could not format a record (any error; its message
/// is reported with the record's file and line).
pub type FormattingError = Box<dyn std::error::Error + Send + Sync>;

/// `SFTTrainer` = the shared loop with SFT's data and loss.
pub type SFTTrainer<M> = Trainer<M, SFTHooks>;

/// SFT's collation and loss.
#[derive(Debug, Clone)]
pub struct SFTHooks {
    pub pad_token_id: i64,
    pub pad_to_multiple_of: Option<usize>,
    /// TRL's padding-free collator (one row, positions restarting per sequence).
    pub padding_free: bool,
    /// Tokens per chunk of the loss computation (see [`LOSS_CHUNK_TOKENS`]).
    pub loss_chunk_tokens: i64,
    /// Compute padded batches on their real tokens only ([`crate::data::unpad`];
    /// SFTConfig's `unpad_batches`).
    pub unpad: bool,
}

impl SFTHooks {
    pub fn new(args: &SFTConfig, tokenizer: &PreTrainedTokenizer) -> Self {
        Self {
            pad_token_id: collator_pad_token_id(tokenizer, args).unwrap_or(0),
            pad_to_multiple_of: args.pad_to_multiple_of,
            padding_free: args.uses_padding_free(),
            loss_chunk_tokens: LOSS_CHUNK_TOKENS,
            // NEFTune (refused for now) scales its noise by the padded length in
            // transformers: such runs would have to stay dense to match.
            unpad: args.unpad_batches && args.neftune_noise_alpha.is_none(),
        }
    }

    /// Keeps padded compute where unpadding could not reproduce it exactly: an
    /// adapter with dropout on `lm_head` sees the loss chunks, whose shapes
    /// differ once unpadded, so its dropout masks would too.
    fn adapt_to(&mut self, peft: Option<&PeftAdapter>) {
        if let Some(p) = peft {
            let head = p
                .modules
                .iter()
                .any(|m| m == "lm_head" || m.ends_with(".lm_head"));
            if head && p.config.lora_dropout > 0.0 {
                self.unpad = false;
            }
        }
    }
}

impl<M: PreTrainedModel> TrainingHooks<M> for SFTHooks {
    type Args = SFTConfig;
    type Example = TokenizedExample;
    type Batch = Batch;

    fn metric_names(&self) -> Vec<&'static str> {
        vec!["entropy", "mean_token_accuracy"]
    }

    fn example_len(&self, example: &TokenizedExample) -> usize {
        example.input_ids.len()
    }

    fn fingerprint(&self, examples: &[TokenizedExample]) -> String {
        super::output_dir::fingerprint_examples(examples)
    }

    fn collate(&self, examples: &[&TokenizedExample], device: Device) -> Batch {
        collate_with(
            examples,
            self.pad_token_id,
            self.pad_to_multiple_of,
            self.padding_free,
            device,
        )
    }

    fn num_loss_tokens(&self, batch: &Batch) -> i64 {
        batch.num_loss_tokens
    }

    fn num_input_slots(&self, batch: &Batch) -> i64 {
        batch.input_ids.numel() as i64
    }

    /// transformers' `ForCausalLMLoss` plus TRL's entropy and token accuracy.
    /// With `num_items` the summed token loss is divided by it (gradient
    /// accumulation); without, it is the mean over the batch's loss tokens.
    fn compute_loss(
        &self,
        model: &M,
        batch: &Batch,
        num_items: Option<i64>,
        train: bool,
    ) -> Result<LossOutput, TrainerError> {
        // What the run reports comes from the padded batch, whatever is computed.
        let num_tokens = batch.attention_mask.sum(Kind::Int64).int64_value(&[]);
        let denom = num_items.unwrap_or(batch.num_loss_tokens).max(1) as f64;
        let unpadded = if self.unpad { unpad(batch) } else { None };
        let (input, labels) = match &unpadded {
            Some(u) => (
                CausalLMInput {
                    input_ids: &u.input_ids,
                    attention_mask: None,
                    position_ids: Some(&u.position_ids),
                    seq_lens: Some(&u.seq_lens),
                },
                &u.labels,
            ),
            None => (
                CausalLMInput {
                    input_ids: &batch.input_ids,
                    attention_mask: batch.has_padding.then_some(&batch.attention_mask),
                    position_ids: batch.position_ids.as_ref(),
                    seq_lens: batch.seq_lens.as_deref(),
                },
                &batch.labels,
            ),
        };
        let run = || {
            model.forward_for_loss(&input, train, train, |hidden| {
                chunked_lm_loss(model, hidden, labels, denom, train, self.loss_chunk_tokens)
            })
        };
        let out = match &unpadded {
            Some(u) => with_padded_rows(&u.rows, run),
            None => run(),
        };
        Ok(LossOutput {
            loss: out.loss,
            num_tokens,
            metrics: vec![
                ("entropy", out.entropy),
                ("mean_token_accuracy", out.accuracy),
            ],
        })
    }
}

impl<M: PreTrainedModel> Trainer<M, SFTHooks> {
    /// `SFTTrainer(model=…, args=…, …)` with TRL's keyword arguments as
    /// builder methods; [`SFTTrainerBuilder::build`] prepares the data and
    /// attaches the adapters.
    pub fn builder<'d>(model: M, args: SFTConfig) -> SFTTrainerBuilder<'d, M> {
        SFTTrainerBuilder {
            model,
            args,
            train_dataset: None,
            eval_dataset: None,
            processing_class: None,
            adapters: Adapters::None,
            formatting_func: None,
            callbacks: Vec::new(),
        }
    }

    /// Tokens per loss chunk (default [`LOSS_CHUNK_TOKENS`]): smaller bounds the
    /// logits memory further at some speed cost.
    pub fn set_loss_chunk_tokens(&mut self, tokens: i64) {
        self.hooks.loss_chunk_tokens = tokens.max(1);
    }
}

/// Where the trained adapters come from.
enum Adapters {
    /// Full fine-tuning.
    None,
    /// New adapters from this config (TRL's `peft_config`).
    New(LoraConfig),
    /// Adapters the model already carries (TRL accepts a `PeftModel`), e.g.
    /// loaded with [`PeftAdapter::load`] to continue training them.
    Existing(PeftAdapter),
}

/// Builds an [`SFTTrainer`]; see [`Trainer::builder`].
pub struct SFTTrainerBuilder<'d, M: PreTrainedModel> {
    model: M,
    args: SFTConfig,
    train_dataset: Option<&'d Dataset>,
    eval_dataset: Option<&'d Dataset>,
    processing_class: Option<PreTrainedTokenizer>,
    adapters: Adapters,
    formatting_func: Option<FormattingFunc>,
    callbacks: Vec<Box<dyn TrainerCallback>>,
}

impl<'d, M: PreTrainedModel> SFTTrainerBuilder<'d, M> {
    pub fn train_dataset(mut self, dataset: &'d Dataset) -> Self {
        self.train_dataset = Some(dataset);
        self
    }

    /// The evaluation set (an empty one means none).
    pub fn eval_dataset(mut self, dataset: &'d Dataset) -> Self {
        self.eval_dataset = Some(dataset);
        self
    }

    /// The tokenizer (default: the one saved with the model).
    pub fn processing_class(mut self, tokenizer: PreTrainedTokenizer) -> Self {
        self.processing_class = Some(tokenizer);
        self
    }

    /// Train new LoRA adapters with this config (`None`: full fine-tuning).
    pub fn peft_config(mut self, config: Option<LoraConfig>) -> Self {
        self.adapters = config.map_or(Adapters::None, Adapters::New);
        self
    }

    /// Continue training adapters the model already carries.
    pub fn peft_model(mut self, adapter: PeftAdapter) -> Self {
        self.adapters = Adapters::Existing(adapter);
        self
    }

    pub fn formatting_func(mut self, func: FormattingFunc) -> Self {
        self.formatting_func = Some(func);
        self
    }

    /// Callbacks run after the default ones, in this order.
    pub fn callbacks(mut self, callbacks: Vec<Box<dyn TrainerCallback>>) -> Self {
        self.callbacks = callbacks;
        self
    }

    /// Validates the config, prepares the datasets and attaches the adapters.
    pub fn build(self) -> Result<SFTTrainer<M>, TrainerError> {
        let Self {
            mut model,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            adapters,
            formatting_func,
            callbacks,
        } = self;
        args.validate()?;
        check_supported(&args)?;
        let train_dataset = train_dataset
            .ok_or_else(|| TrainerError::Invalid("SFTTrainer needs a train_dataset".into()))?;
        let mut tokenizer = match processing_class {
            Some(t) => t,
            None => load_tokenizer(&model.name_or_path())?,
        };
        // chat_template_path, eos_token: what TRL changes on the processing class.
        apply_sft_tokenizer_args(&mut tokenizer, &args)?;
        let (train, eval) = prepare_datasets(
            &args,
            &tokenizer,
            train_dataset,
            eval_dataset,
            formatting_func.as_ref(),
        )?;
        let peft = match adapters {
            Adapters::None => None,
            Adapters::New(mut cfg) => {
                if cfg.base_model_name_or_path.is_none() {
                    cfg.base_model_name_or_path = Some(model.name_or_path());
                }
                tch::manual_seed(args.seed as i64);
                let device = model.device();
                Some(PeftAdapter::attach_new(&mut model, cfg, device)?)
            }
            Adapters::Existing(adapter) => Some(adapter),
        };
        let mut hooks = SFTHooks::new(&args, &tokenizer);
        hooks.adapt_to(peft.as_ref());
        Ok(Trainer::new(
            model,
            args,
            (train, eval),
            tokenizer,
            peft,
            hooks,
            callbacks,
        ))
    }
}

/// TRL's fallback when no `processing_class` is given: the model's own tokenizer.
fn load_tokenizer(model_dir: &str) -> Result<PreTrainedTokenizer, TrainerError> {
    PreTrainedTokenizer::from_pretrained(std::path::Path::new(model_dir)).map_err(|e| {
        TrainerError::Invalid(format!(
            "no processing_class given and the tokenizer of {model_dir:?} could not be loaded ({e}); \
             pass one with .processing_class(..)"
        ))
    })
}

/// The training set and, when given and not empty, the evaluation set,
/// tokenized (and packed) as TRL prepares them.
fn prepare_datasets(
    args: &SFTConfig,
    tokenizer: &PreTrainedTokenizer,
    train_dataset: &Dataset,
    eval_dataset: Option<&Dataset>,
    formatting_func: Option<&FormattingFunc>,
) -> Result<(Vec<TokenizedExample>, Option<Vec<TokenizedExample>>), TrainerError> {
    let (train, stats) = prepare_and_pack(
        train_dataset,
        tokenizer,
        args,
        formatting_func,
        args.packing,
    )?;
    if stats.truncated > 0 {
        log::info!(
            "note: {} of {} training examples were longer than max_length {} and were truncated",
            stats.truncated,
            train.len(),
            args.max_length
                .map_or("none".to_string(), |m| m.to_string())
        );
    }
    let train = drop_examples_without_loss(train, "training", args.max_length)?;
    let eval = match eval_dataset {
        Some(ds) if !ds.is_empty() => {
            let packing = args.eval_packing.unwrap_or(args.packing);
            let (eval, _) = prepare_and_pack(ds, tokenizer, args, formatting_func, packing)?;
            Some(drop_examples_without_loss(
                eval,
                "evaluation",
                args.max_length,
            )?)
        }
        _ => None,
    };
    Ok((train, eval))
}

/// Statistics of dataset preparation, for messages and `glm4 preview`.
#[derive(Debug, Clone, Default)]
pub struct PrepareStats {
    pub format: Option<DatasetFormat>,
    pub truncated: usize,
    pub skipped: usize,
}

/// Formats and tokenizes a dataset with TRL's rules (see [`crate::data::tokenize`]).
pub fn prepare_dataset(
    dataset: &Dataset,
    tokenizer: &PreTrainedTokenizer,
    args: &SFTConfig,
    format: DatasetFormat,
    formatting_func: Option<&FormattingFunc>,
    skip_bad_records: bool,
) -> Result<(Vec<TokenizedExample>, PrepareStats), TrainerError> {
    let opts = TokenizeOptions {
        max_length: args.max_length,
        truncation_mode: args.truncation_mode,
        completion_only_loss: args.completion_only_loss,
        assistant_only_loss: args.assistant_only_loss,
    };
    let mut stats = PrepareStats::default();
    let format = match (formatting_func, dataset.records.first()) {
        (Some(_), _) | (None, None) => format,
        (None, Some(first)) => format.resolve(first)?,
    };
    stats.format = Some(format);
    let mut out = Vec::with_capacity(dataset.len());
    for record in &dataset.records {
        let example =
            match formatting_func {
                Some(f) => f(&record.value).map(Example::Text).map_err(|e| {
                    crate::data::DataError::Record {
                        origin: record.origin.clone(),
                        message: e.to_string(),
                    }
                }),
                None => formats::to_example(record, format, &args.dataset_text_field),
            };
        let tokenized = example.and_then(|ex| {
            tokenize_example(tokenizer, &ex, &opts).map_err(|source| {
                crate::data::DataError::Tokenizer {
                    origin: record.origin.clone(),
                    error: source,
                }
            })
        });
        match tokenized {
            Ok(t) => {
                if t.truncated_tokens > 0 {
                    stats.truncated += 1;
                }
                out.push(t);
            }
            Err(e) if skip_bad_records => {
                log::warn!("skipping {e}");
                stats.skipped += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if out.is_empty() {
        return Err(TrainerError::Invalid(
            "no usable records in the dataset".into(),
        ));
    }
    Ok((out, stats))
}

/// Refuses settings this trainer would otherwise silently ignore.
fn check_supported(args: &SFTConfig) -> Result<(), TrainerError> {
    let unsupported = [
        ("neftune_noise_alpha", args.neftune_noise_alpha.is_some()),
        ("shuffle_dataset", args.shuffle_dataset),
        (
            "loss_type (only nll)",
            args.loss_type != crate::config::LossType::Nll,
        ),
        ("fp16 (use bf16 or float32)", args.fp16),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(TrainerError::Invalid(format!(
            "{name} is not supported yet; remove it from the config or flags"
        )));
    }
    Ok(())
}
