//! `SFTTrainer`: TRL's supervised fine-tuning loop over any [`PreTrainedModel`].
//!
//! The recipe, as transformers' `Trainer.train` runs it: prepare the datasets
//! (format, chat template, eos, tokenize, truncate), attach LoRA adapters (or
//! train every weight), build AdamW + the LR schedule, then for each optimizer
//! step accumulate `gradient_accumulation_steps` micro-batches whose summed
//! token losses are divided by the token count of the whole window, clip, step,
//! and let the callbacks decide when to log, evaluate and save. Checkpoints
//! hold everything needed to resume exactly where the run stopped.

pub mod callbacks;
pub mod checkpoint;
mod packing;
pub mod state;

pub use callbacks::{
    CallbackContext, DefaultFlowCallback, EarlyStoppingCallback, PrinterCallback, ProgressCallback,
    TrainerCallback,
};
pub use packing::prepare_and_pack;
pub use state::{StateFileError, TrainerControl, TrainerState};

use crate::config::{SFTConfig, SamplingStrategy};
use crate::data::tokenize::{tokenize_example, IGNORE_INDEX};
use crate::data::{
    collate_with, formats, Batch, Dataset, DatasetFormat, Example, TokenizeOptions,
    TokenizedExample,
};
use crate::distributed::{shard_round_robin, ProcessGroup, ReduceOp};
use crate::modeling::{CausalLMInput, PreTrainedModel};
use crate::optim::{clip_grad_norm, decay_groups, AdamW, LrScheduler};
use crate::peft::{LoraConfig, PeftAdapter};
use crate::tokenizer::PreTrainedTokenizer;
use crate::tracking::{make_trackers, plot_training_curves, Tracker};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

/// Why training could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Peft(#[from] crate::peft::PeftError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tracking(#[from] crate::tracking::TrackingError),
    #[error(transparent)]
    Distributed(#[from] crate::distributed::DistError),
    #[error("{0}")]
    Checkpoint(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Turns a raw record into the text to train on (the tutorial's `formatting_func`).
pub type FormattingFunc = Box<dyn Fn(&Value) -> Result<String, FormattingError>>;

/// Why a [`FormattingFunc`] could not format a record (any error; its message
/// is reported with the record's file and line).
pub type FormattingError = Box<dyn std::error::Error + Send + Sync>;

/// Returned by [`SFTTrainer::train`] (transformers' `TrainOutput`).
#[derive(Debug, Clone)]
pub struct TrainOutput {
    pub global_step: usize,
    pub training_loss: f64,
    pub metrics: Map<String, Value>,
}

/// Token-weighted sums of a logging window (TRL's `_metrics`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct WindowMetrics {
    /// Sum of per-step mean losses since the last log.
    loss_sum: f64,
    /// Per-micro-batch values TRL averages at log time.
    entropy: Vec<f64>,
    accuracy: Vec<f64>,
}

/// Loop counters that are not part of `trainer_state.json` but make a resumed
/// run continue exactly (saved as `trainer_extra.json` in checkpoints).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct LoopState {
    window: WindowMetrics,
    total_loss: f64,
    last_logged_step: usize,
    last_grad_norm: Option<f64>,
}

pub struct SFTTrainer<M: PreTrainedModel> {
    pub model: M,
    pub args: SFTConfig,
    pub processing_class: PreTrainedTokenizer,
    pub train_dataset: Vec<TokenizedExample>,
    pub eval_dataset: Option<Vec<TokenizedExample>>,
    /// The adapters being trained (`None` for full fine-tuning).
    pub peft: Option<PeftAdapter>,
    pub state: TrainerState,
    pub control: TrainerControl,
    callbacks: Vec<Box<dyn TrainerCallback>>,
    trackers: Vec<Box<dyn Tracker>>,
    /// Trainable tensors by name: adapter weights, or every base weight.
    params: Vec<(String, Tensor)>,
    optimizer: Option<AdamW>,
    loop_state: LoopState,
    device: Device,
    /// Learning rate of the last optimizer step (what transformers logs).
    current_lr: f64,
    /// The step at which an interrupt stopped training, if one did.
    pub interrupted_at: Option<usize>,
    /// Tokens per chunk of the loss computation (see [`LOSS_CHUNK_TOKENS`]).
    loss_chunk_tokens: i64,
    /// Set from outside (e.g. a Ctrl-C handler) to stop after the current step with a checkpoint.
    interrupt: Arc<AtomicBool>,
    /// Optimizer steps skipped in a row because the loss or gradient was not finite.
    nonfinite_in_a_row: usize,
    /// Give up after this many non-finite steps in a row.
    max_nonfinite_steps: usize,
    /// The data-parallel process group under torchrun (`None`: one process).
    process_group: Option<ProcessGroup>,
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
                    source,
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
                eprintln!("warning: skipping {e}");
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

impl<M: PreTrainedModel> SFTTrainer<M> {
    /// `SFTTrainer(model, args, train_dataset, eval_dataset, processing_class,
    /// peft_config, formatting_func, callbacks)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut model: M,
        args: SFTConfig,
        train_dataset: &Dataset,
        eval_dataset: Option<&Dataset>,
        processing_class: PreTrainedTokenizer,
        peft_config: Option<LoraConfig>,
        formatting_func: Option<FormattingFunc>,
        callbacks: Vec<Box<dyn TrainerCallback>>,
    ) -> Result<Self, TrainerError> {
        args.validate()?;
        check_supported(&args)?;
        let device = model.device();
        let (train, stats) = prepare_and_pack(
            train_dataset,
            &processing_class,
            &args,
            formatting_func.as_ref(),
            args.packing,
        )?;
        if stats.truncated > 0 {
            eprintln!(
                "note: {} of {} training examples were longer than max_length {} and were truncated",
                stats.truncated,
                train.len(),
                args.max_length.map_or("none".to_string(), |m| m.to_string())
            );
        }
        let eval = match eval_dataset {
            Some(ds) if !ds.is_empty() => Some(
                prepare_and_pack(
                    ds,
                    &processing_class,
                    &args,
                    formatting_func.as_ref(),
                    args.eval_packing.unwrap_or(args.packing),
                )?
                .0,
            ),
            _ => None,
        };
        let peft = match peft_config {
            Some(mut cfg) => {
                if cfg.base_model_name_or_path.is_none() {
                    cfg.base_model_name_or_path = Some(model.name_or_path());
                }
                tch::manual_seed(args.seed as i64);
                Some(PeftAdapter::attach_new(&mut model, cfg, device)?)
            }
            None => None,
        };
        Ok(Self::build(
            model,
            args,
            train,
            eval,
            processing_class,
            peft,
            callbacks,
        ))
    }

    /// Like [`new`](Self::new) for a model that already carries adapters
    /// (TRL accepts a `PeftModel`): e.g. adapters loaded with
    /// [`PeftAdapter::load`] to continue training them.
    #[allow(clippy::too_many_arguments)]
    pub fn from_peft_model(
        model: M,
        adapter: PeftAdapter,
        args: SFTConfig,
        train_dataset: &Dataset,
        eval_dataset: Option<&Dataset>,
        processing_class: PreTrainedTokenizer,
        formatting_func: Option<FormattingFunc>,
        callbacks: Vec<Box<dyn TrainerCallback>>,
    ) -> Result<Self, TrainerError> {
        args.validate()?;
        check_supported(&args)?;
        let (train, _) = prepare_and_pack(
            train_dataset,
            &processing_class,
            &args,
            formatting_func.as_ref(),
            args.packing,
        )?;
        let eval = match eval_dataset {
            Some(ds) if !ds.is_empty() => Some(
                prepare_and_pack(
                    ds,
                    &processing_class,
                    &args,
                    formatting_func.as_ref(),
                    args.eval_packing.unwrap_or(args.packing),
                )?
                .0,
            ),
            _ => None,
        };
        Ok(Self::build(
            model,
            args,
            train,
            eval,
            processing_class,
            Some(adapter),
            callbacks,
        ))
    }

    fn build(
        model: M,
        args: SFTConfig,
        train: Vec<TokenizedExample>,
        eval: Option<Vec<TokenizedExample>>,
        processing_class: PreTrainedTokenizer,
        peft: Option<PeftAdapter>,
        callbacks: Vec<Box<dyn TrainerCallback>>,
    ) -> Self {
        let device = model.device();
        let params: Vec<(String, Tensor)> = match &peft {
            Some(adapter) => {
                // Like PEFT: the base is frozen, so backward never computes its weight gradients.
                for (_, t) in model.named_parameters() {
                    let _ = t.set_requires_grad(false);
                }
                adapter.named_parameters()
            }
            // Full fine-tuning: every base weight is trained.
            None => model
                .named_parameters()
                .into_iter()
                .map(|(n, t)| (n, t.set_requires_grad(true)))
                .collect(),
        };
        let mut trainer = Self {
            model,
            args,
            processing_class,
            train_dataset: train,
            eval_dataset: eval,
            peft,
            state: TrainerState::default(),
            control: TrainerControl::default(),
            callbacks: Vec::new(),
            trackers: Vec::new(),
            params,
            optimizer: None,
            loop_state: LoopState::default(),
            device,
            current_lr: 0.0,
            interrupted_at: None,
            loss_chunk_tokens: LOSS_CHUNK_TOKENS,
            interrupt: Arc::new(AtomicBool::new(false)),
            nonfinite_in_a_row: 0,
            max_nonfinite_steps: 5,
            process_group: None,
        };
        trainer.callbacks.push(Box::new(DefaultFlowCallback));
        if trainer.args.disable_tqdm {
            trainer.callbacks.push(Box::new(PrinterCallback));
        } else {
            trainer
                .callbacks
                .push(Box::new(ProgressCallback::default()));
        }
        trainer.callbacks.extend(callbacks);
        trainer.fire(Event::InitEnd, Payload::None);
        trainer
    }

    /// Tokens per loss chunk (default [`LOSS_CHUNK_TOKENS`]): smaller bounds the
    /// logits memory further at some speed cost.
    pub fn set_loss_chunk_tokens(&mut self, tokens: i64) {
        self.loss_chunk_tokens = tokens.max(1);
    }

    /// A flag that, once set (from a signal handler, another thread…), makes
    /// training stop after the current optimizer step, write a checkpoint and
    /// return normally.
    pub fn interrupt_handle(&self) -> Arc<AtomicBool> {
        self.interrupt.clone()
    }

    /// Stop with an error after this many optimizer steps in a row whose loss or
    /// gradient norm is NaN/inf (each such step is skipped, not applied). Default 5.
    pub fn set_max_nonfinite_steps(&mut self, n: usize) {
        self.max_nonfinite_steps = n.max(1);
    }

    /// Trains data-parallel in `group` (one process per rank, launched by
    /// torchrun; see [`crate::distributed`]): each rank takes its share of every
    /// epoch's batches, gradients are summed across ranks once per optimizer
    /// step, metrics are aggregated, and only rank 0 writes files.
    pub fn set_process_group(&mut self, group: ProcessGroup) {
        self.process_group = Some(group);
    }

    pub fn process_group(&self) -> Option<&ProcessGroup> {
        self.process_group.as_ref()
    }

    /// This process's rank and the number of ranks (0 and 1 without a process group).
    pub fn rank_and_world_size(&self) -> (usize, usize) {
        self.process_group
            .as_ref()
            .map_or((0, 1), |g| (g.rank(), g.world_size()))
    }

    /// transformers' `is_world_process_zero`: the process that writes files and logs.
    pub fn is_world_process_zero(&self) -> bool {
        self.rank_and_world_size().0 == 0
    }

    /// Waits for every rank (no-op in a single process).
    fn barrier(&self) -> Result<(), TrainerError> {
        if let Some(g) = &self.process_group {
            g.barrier()?;
        }
        Ok(())
    }

    /// Data-parallel check at the end of training: every rank must hold
    /// bit-identical trainable weights (one MIN and one MAX all-reduce of them;
    /// skipped above [`SYNC_CHECK_MAX_VALUES`], i.e. for large full fine-tunes).
    fn check_ranks_in_sync(&self) -> Result<(), TrainerError> {
        let Some(group) = &self.process_group else {
            return Ok(());
        };
        let total: i64 = self.params.iter().map(|(_, t)| t.numel() as i64).sum();
        if group.world_size() < 2 || total == 0 || total > SYNC_CHECK_MAX_VALUES {
            return Ok(());
        }
        let flat = tch::no_grad(|| {
            Tensor::cat(
                &self
                    .params
                    .iter()
                    .map(|(_, t)| t.detach().reshape([-1]).to_kind(Kind::Float))
                    .collect::<Vec<_>>(),
                0,
            )
        });
        let (mut lo, mut hi) = (flat.copy(), flat);
        group.all_reduce(&mut lo, ReduceOp::Min)?;
        group.all_reduce(&mut hi, ReduceOp::Max)?;
        let differing = lo.ne_tensor(&hi).sum(Kind::Int64).int64_value(&[]);
        if differing > 0 {
            return Err(TrainerError::Invalid(format!(
                "data parallel: the ranks' trainable weights diverged ({differing} of {total} values differ); \
                 the ranks did not run the same updates"
            )));
        }
        if self.is_world_process_zero() {
            eprintln!(
                "data parallel: all {} ranks hold bit-identical trainable weights ({total} values)",
                group.world_size()
            );
        }
        Ok(())
    }

    /// Adds a callback (transformers' `add_callback`).
    pub fn add_callback(&mut self, callback: Box<dyn TrainerCallback>) {
        self.callbacks.push(callback);
    }

    /// Number of trainable parameters and of all parameters, as PEFT's `print_trainable_parameters`.
    pub fn trainable_parameters(&self) -> (i64, i64) {
        let trainable: i64 = self.params.iter().map(|(_, t)| t.numel() as i64).sum();
        let base: i64 = self
            .model
            .named_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum();
        let total = if self.peft.is_some() {
            base + trainable
        } else {
            base
        };
        (trainable, total)
    }

    /// Micro-batches of one epoch: indices into the training set.
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let n = self.train_dataset.len();
        let bs = self.args.per_device_train_batch_size.max(1);
        let seed = self.args.data_seed.unwrap_or(self.args.seed);
        let order: Vec<usize> = match self.args.sampling_strategy() {
            SamplingStrategy::Sequential => (0..n).collect(),
            SamplingStrategy::Random => shuffled(n, seed, epoch),
            SamplingStrategy::GroupByLength => {
                // transformers' LengthGroupedSampler: shuffle, cut into mega-batches of
                // 50 batches, sort each by length (longest first).
                let order = shuffled(n, seed, epoch);
                order
                    .chunks(50 * bs)
                    .flat_map(|chunk| {
                        let mut c = chunk.to_vec();
                        c.sort_by_key(|&i| {
                            std::cmp::Reverse(self.train_dataset[i].input_ids.len())
                        });
                        c
                    })
                    .collect()
            }
        };
        let mut batches: Vec<Vec<usize>> = order.chunks(bs).map(|c| c.to_vec()).collect();
        if self.args.dataloader_drop_last && batches.last().is_some_and(|b| b.len() < bs) {
            batches.pop();
        }
        // Data parallel: every rank draws the same order (same seed and epoch)
        // and takes every world_size-th batch of it.
        let (rank, world_size) = self.rank_and_world_size();
        shard_round_robin(&batches, rank, world_size)
    }

    /// Micro-batches this rank runs per epoch.
    fn num_batches_per_epoch(&self) -> usize {
        let bs = self.args.per_device_train_batch_size.max(1);
        let n = self.train_dataset.len();
        let global = if self.args.dataloader_drop_last {
            n / bs
        } else {
            n.div_ceil(bs)
        };
        global.div_ceil(self.rank_and_world_size().1)
    }

    fn batch_of(&self, indices: &[usize]) -> Batch {
        let examples: Vec<&TokenizedExample> =
            indices.iter().map(|&i| &self.train_dataset[i]).collect();
        collate_with(
            &examples,
            self.pad_token_id(),
            self.args.pad_to_multiple_of,
            self.args.uses_padding_free(),
            self.device,
        )
    }

    fn pad_token_id(&self) -> i64 {
        self.processing_class
            .pad_token_id()
            .or(self.processing_class.eos_token_id())
            .unwrap_or(0)
    }

    /// Runs the training loop; resumes when `resume_from_checkpoint` says so.
    pub fn train(&mut self) -> Result<TrainOutput, TrainerError> {
        let output_dir = PathBuf::from(&self.args.output_dir);
        let resume = checkpoint::resolve_resume(&self.args, &output_dir)?;
        // No rank may see another's first files as an "existing output directory".
        self.barrier()?;
        std::fs::create_dir_all(&output_dir).map_err(io_err(&output_dir))?;

        let batches_per_epoch = self.num_batches_per_epoch();
        if batches_per_epoch == 0 {
            return Err(TrainerError::Invalid(format!(
                "the training set has {} examples, fewer than one batch of {} with dataloader_drop_last",
                self.train_dataset.len(),
                self.args.per_device_train_batch_size
            )));
        }
        let ga = self.args.gradient_accumulation_steps.max(1);
        let steps_per_epoch = self.args.num_update_steps_per_epoch(batches_per_epoch);
        let max_steps = self.args.total_training_steps(batches_per_epoch);
        let num_epochs = max_steps.div_ceil(steps_per_epoch);

        self.state = TrainerState {
            max_steps,
            logging_steps: self.args.resolved_logging_steps(max_steps),
            eval_steps: self.args.resolved_eval_steps(max_steps),
            save_steps: self.args.resolved_save_steps(max_steps),
            train_batch_size: self.args.per_device_train_batch_size,
            num_train_epochs: num_epochs,
            is_world_process_zero: self.is_world_process_zero(),
            is_local_process_zero: self
                .process_group
                .as_ref()
                .is_none_or(|g| g.local_rank() == 0),
            ..TrainerState::default()
        };
        let groups = decay_groups(
            self.params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            self.args.weight_decay,
        );
        let mut optimizer = AdamW::new(
            groups,
            (self.args.adam_beta1, self.args.adam_beta2),
            self.args.adam_epsilon,
        );
        let warmup = self.args.get_warmup_steps(max_steps);
        let scheduler = LrScheduler::new(
            self.args.lr_scheduler_type.as_str(),
            self.args.learning_rate,
            warmup,
            max_steps,
            &self.args.lr_scheduler_kwargs,
        )?;
        self.loop_state = LoopState::default();
        self.interrupted_at = None;
        self.interrupt.store(false, Ordering::SeqCst);
        if let Some(dir) = &resume {
            self.load_checkpoint(dir, &mut optimizer)?;
            eprintln!(
                "resuming from {} at step {}",
                dir.display(),
                self.state.global_step
            );
        }
        if let Some(group) = &self.process_group {
            // DDP's start: every rank begins from rank 0's trainable weights.
            let tensors: Vec<Tensor> = self.params.iter().map(|(_, t)| t.shallow_clone()).collect();
            group.broadcast_parameters(&tensors)?;
        }
        self.optimizer = Some(optimizer);
        let logging_dir = output_dir.join("runs");
        let run_name = self.args.run_name.clone().unwrap_or_default();
        self.trackers = if self.is_world_process_zero() {
            make_trackers(&self.args.report_to, &logging_dir, &run_name)?
        } else {
            Vec::new()
        };

        let (trainable, total) = self.trainable_parameters();
        let (_, world_size) = self.rank_and_world_size();
        if world_size > 1 && self.is_world_process_zero() {
            eprintln!(
                "data parallel: {} ranks ({} backend), global batch {} x {} x {} = {}",
                world_size,
                self.process_group
                    .as_ref()
                    .map_or("", |g| g.backend().name()),
                self.args.per_device_train_batch_size,
                world_size,
                ga,
                self.args.per_device_train_batch_size * world_size * ga
            );
        }
        if self.is_world_process_zero() {
            eprintln!(
            "***** Running training *****\n  examples = {}, epochs = {}, batch size = {}, accumulation = {}, optimizer steps = {}\n  trainable params: {} || all params: {} || trainable%: {:.4}",
            self.train_dataset.len(),
            num_epochs,
            self.args.per_device_train_batch_size,
            ga,
            max_steps,
            trainable,
            total,
            100.0 * trainable as f64 / total.max(1) as f64
            );
        }

        let start = Instant::now();
        let start_step = self.state.global_step;
        let tokens_at_start = self.state.num_input_tokens_seen;
        self.fire(Event::TrainBegin, Payload::None);
        if self.args.eval_on_start && start_step == 0 {
            self.evaluate()?;
        }
        let epochs_done = start_step / steps_per_epoch;
        let mut skip_steps = start_step % steps_per_epoch;
        'epochs: for epoch in epochs_done..num_epochs {
            self.fire(Event::EpochBegin, Payload::None);
            let batches = self.epoch_batches(epoch);
            for (window_idx, window) in batches.chunks(ga).enumerate() {
                if skip_steps > 0 {
                    skip_steps -= 1;
                    continue;
                }
                let interrupted =
                    self.training_step(window, epoch, window_idx, batches.len(), &scheduler)?;
                self.fire(Event::StepEnd, Payload::None);
                if interrupted && !self.control.should_training_stop {
                    // Finish like a planned end: log, checkpoint, stop.
                    self.control.should_training_stop = true;
                    self.control.should_save =
                        self.args.save_strategy != crate::config::SaveStrategy::No;
                    self.control.should_log = true;
                    self.interrupted_at = Some(self.state.global_step);
                }
                self.maybe_log_save_evaluate(&output_dir)?;
                crash_point("TRL_LIKE_CRASH_AFTER_STEP", self.state.global_step);
                if self.control.should_epoch_stop || self.control.should_training_stop {
                    break;
                }
            }
            self.fire(Event::EpochEnd, Payload::None);
            self.maybe_log_save_evaluate(&output_dir)?;
            if self.control.should_training_stop {
                break 'epochs;
            }
        }

        self.check_ranks_in_sync()?;
        if self.args.load_best_model_at_end {
            if let Some(best) = self.state.best_model_checkpoint.clone() {
                eprintln!(
                    "loading the best checkpoint {best} (metric {:?})",
                    self.state.best_metric
                );
                self.load_weights(Path::new(&best))?;
            }
        }
        let runtime = start.elapsed().as_secs_f64();
        let steps = (self.state.global_step - start_step) as f64;
        let samples = steps * (self.args.per_device_train_batch_size * ga * world_size) as f64;
        let tokens = (self.state.num_input_tokens_seen - tokens_at_start) as f64;
        let train_loss = self.loop_state.total_loss / self.state.global_step.max(1) as f64;
        let mut metrics = Map::new();
        metrics.insert("train_runtime".into(), json!(round(runtime, 4)));
        metrics.insert(
            "train_samples_per_second".into(),
            json!(round(samples / runtime.max(1e-9), 3)),
        );
        metrics.insert(
            "train_steps_per_second".into(),
            json!(round(steps / runtime.max(1e-9), 3)),
        );
        metrics.insert(
            "train_tokens_per_second".into(),
            json!(round(tokens / runtime.max(1e-9), 3)),
        );
        metrics.insert("total_flos".into(), json!(self.state.total_flos));
        metrics.insert("train_loss".into(), json!(train_loss));
        self.log(metrics.clone());
        self.fire(Event::TrainEnd, Payload::None);
        if self.is_world_process_zero() {
            // An interrupted run is not finished: only its checkpoint says where it is.
            if self.interrupted_at.is_none() {
                self.state
                    .save_to_json(&output_dir.join("trainer_state.json"), &self.control)
                    .map_err(io_err(&output_dir))?;
            }
            let history: Vec<Value> = self
                .state
                .log_history
                .iter()
                .cloned()
                .map(Value::Object)
                .collect();
            for name in ["training_curves.svg", "training_curves.png"] {
                let plot = output_dir.join(name);
                plot_training_curves(&history, &plot).map_err(io_err(&plot))?;
            }
            for t in &mut self.trackers {
                let _ = t.flush();
            }
        }
        Ok(TrainOutput {
            global_step: self.state.global_step,
            training_loss: train_loss,
            metrics,
        })
    }

    /// One optimizer step over a window of micro-batches. Returns whether an
    /// interrupt was requested (on any rank: all ranks stop at the same step).
    fn training_step(
        &mut self,
        window: &[Vec<usize>],
        epoch: usize,
        window_idx: usize,
        batches_in_epoch: usize,
        scheduler: &LrScheduler,
    ) -> Result<bool, TrainerError> {
        self.fire(Event::StepBegin, Payload::None);
        // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
        tch::manual_seed(self.args.seed as i64 + 1_000_003 * self.state.global_step as i64);
        let batches: Vec<Batch> = window.iter().map(|idx| self.batch_of(idx)).collect();
        // transformers' num_items_in_batch: loss tokens of the whole window, so the
        // step's loss is the token mean over all its examples however they are split
        // (across ranks too with average_tokens_across_devices).
        let mut num_items: i64 = batches.iter().map(|b| b.num_loss_tokens).sum();
        let average_across_ranks = self.args.average_tokens_across_devices;
        if let (Some(group), true) = (&self.process_group, average_across_ranks) {
            let mut n = [num_items as f64];
            group.all_reduce_f64(&mut n, ReduceOp::Sum)?;
            num_items = n[0] as i64;
        }
        let mut step_loss = 0.0;
        let mut step_tokens = 0i64;
        let (mut entropies, mut accuracies) = (Vec::new(), Vec::new());
        for (i, batch) in batches.iter().enumerate() {
            let out = self.forward_backward(batch, Some(num_items.max(1)), true, true);
            step_loss += out.loss;
            entropies.push(out.entropy);
            accuracies.push(out.accuracy);
            step_tokens += out.num_tokens;
            if i + 1 < batches.len() {
                self.fire(Event::SubstepEnd, Payload::None);
            }
        }
        if let Ok(v) = std::env::var("TRL_LIKE_NAN_AT_STEP") {
            // Fault injection for the tests: poison this step's loss.
            if v.split(',')
                .any(|s| s.trim().parse::<usize>().ok() == Some(self.state.global_step + 1))
            {
                step_loss = f64::NAN;
            }
        }
        let mut interrupted = self.interrupt.load(Ordering::SeqCst);
        let tensors: Vec<Tensor> = self.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        if let Some(group) = &self.process_group {
            let world = group.world_size() as f64;
            // Each rank's loss is its token sum over the global count, so summing
            // the gradients gives the single-process gradient of the union batch.
            // Without average_tokens_across_devices each rank normalised by its
            // own tokens and the ranks are averaged, as DDP does.
            let scale = if average_across_ranks {
                1.0
            } else {
                1.0 / world
            };
            group.all_reduce_gradients(&tensors, scale)?;
            // One collective for the step's metrics and the stop flag:
            // [loss, tokens, interrupt, entropies.., accuracies..].
            let mut v = vec![step_loss, step_tokens as f64, interrupted as u8 as f64];
            v.extend(&entropies);
            v.extend(&accuracies);
            group.all_reduce_f64(&mut v, ReduceOp::Sum)?;
            step_loss = v[0] * scale;
            step_tokens = v[1] as i64;
            interrupted = v[2] > 0.0;
            let n = entropies.len();
            entropies = v[3..3 + n].iter().map(|e| e / world).collect();
            accuracies = v[3 + n..].iter().map(|a| a / world).collect();
        }
        self.loop_state.window.entropy.extend(entropies);
        self.loop_state.window.accuracy.extend(accuracies);
        self.state.num_input_tokens_seen += step_tokens;
        let grad_norm = clip_grad_norm(&tensors, self.args.max_grad_norm);
        self.fire(Event::PreOptimizerStep, Payload::None);
        let lr = scheduler.lr_at(self.state.global_step);
        let finite = step_loss.is_finite() && grad_norm.is_finite();
        if finite {
            self.nonfinite_in_a_row = 0;
            let optimizer = self
                .optimizer
                .as_mut()
                .expect("optimizer is set in train()");
            optimizer.step(lr);
        } else {
            // A NaN/inf update would poison the weights (and every later step): skip it.
            self.nonfinite_in_a_row += 1;
            eprintln!(
                "warning: step {}: loss {step_loss} / grad_norm {grad_norm} is not finite; the update is skipped ({} in a row)",
                self.state.global_step + 1,
                self.nonfinite_in_a_row
            );
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps {
                return Err(TrainerError::Invalid(format!(
                    "{} optimizer steps in a row had a NaN/inf loss or gradient (last at step {}); stopping. \
                     Lower the learning rate, check the data, or resume from the last checkpoint",
                    self.nonfinite_in_a_row,
                    self.state.global_step + 1
                )));
            }
        }
        self.fire(Event::OptimizerStep, Payload::None);
        self.optimizer.as_ref().expect("optimizer").zero_grad();
        self.state.global_step += 1;
        // transformers: epoch + micro-batches done in this epoch / micro-batches per epoch.
        let done = (window_idx * self.args.gradient_accumulation_steps.max(1) + window.len())
            .min(batches_in_epoch);
        self.state.epoch = Some(epoch as f64 + done as f64 / batches_in_epoch as f64);
        // Non-finite losses stay out of the logged averages (transformers' logging_nan_inf_filter).
        let logged = if finite || !self.args.logging_nan_inf_filter {
            step_loss
        } else {
            self.loop_state.total_loss / self.state.global_step.max(1) as f64
        };
        self.loop_state.window.loss_sum += logged;
        self.loop_state.total_loss += logged;
        self.loop_state.last_grad_norm = Some(grad_norm);
        // transformers logs the rate this step used.
        self.current_lr = lr;
        Ok(interrupted)
    }
}

/// Result of one forward (and backward) pass.
struct LossOutput {
    /// The scalar loss: summed token losses / `num_items`, or the batch's token mean.
    loss: f64,
    /// Mean entropy of the predicted distributions at the positions that take loss.
    entropy: f64,
    /// Share of loss tokens whose argmax prediction is the label.
    accuracy: f64,
    /// Real tokens in the batch (attention-mask ones).
    num_tokens: i64,
}

/// Tokens per loss chunk: the fp32 logits of one chunk are `chunk × vocab`
/// (256 × 151,552 × 4 B = 155 MB for GLM-4) instead of the whole batch's
/// (2 × 512 tokens: 620 MB, plus their gradient).
pub const LOSS_CHUNK_TOKENS: i64 = 256;

/// Largest number of trainable values whose cross-rank equality is checked at
/// the end of a data-parallel run (LoRA adapters are far below it).
pub const SYNC_CHECK_MAX_VALUES: i64 = 200_000_000;

/// Training events, mapped onto [`TrainerCallback`] methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    InitEnd,
    TrainBegin,
    TrainEnd,
    EpochBegin,
    EpochEnd,
    StepBegin,
    SubstepEnd,
    PreOptimizerStep,
    OptimizerStep,
    StepEnd,
    Evaluate,
    PredictionStep,
    Save,
    Log,
}

enum Payload<'a> {
    None,
    Logs(&'a Map<String, Value>),
    Metrics(&'a Map<String, Value>),
    Checkpoint(&'a Path),
}

/// Hands memory freed by evaluation, generation and checkpointing back to the
/// OS. Their tensors come in many sizes, and glibc keeps such freed blocks in
/// its arenas: without this the resident size creeps up over a long run
/// although nothing leaks.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
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

/// Fault injection for the crash/resume tests: when the environment variable
/// `var` equals `step`, the process dies on the spot (`abort`, no cleanup — as
/// close to `kill -9` as a process can do to itself, and deterministic).
/// With `TRL_LIKE_CRASH_RANK` set, only the process of that `RANK` dies.
pub(crate) fn crash_point(var: &str, step: usize) {
    let rank_matches = match std::env::var("TRL_LIKE_CRASH_RANK") {
        Ok(r) => std::env::var("RANK").ok().as_deref() == Some(r.trim()),
        Err(_) => true,
    };
    if rank_matches
        && std::env::var(var)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            == Some(step)
    {
        eprintln!("{var}={step}: aborting on purpose");
        std::process::abort();
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// A seeded shuffle of `0..n` for `epoch` (same order for the same seed and epoch,
/// which is what makes resuming exact).
fn shuffled(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    crate::data::permutation(n, seed.wrapping_add(epoch as u64))
}

impl<M: PreTrainedModel> SFTTrainer<M> {
    /// One forward pass with transformers' `ForCausalLMLoss` (plus TRL's entropy
    /// and token accuracy) and, when `backward`, the backward pass.
    ///
    /// With `num_items` the summed token loss is divided by it (gradient
    /// accumulation); without, it is the mean over the batch's loss tokens.
    ///
    /// Memory: the loss is computed in sequence chunks of about
    /// [`LOSS_CHUNK_TOKENS`] tokens, each chunk's logits freed after its backward,
    /// so the full `[batch, seq, vocab]` fp32 logits never exist. With
    /// `gradient_checkpointing` the decoder layers also run without keeping
    /// activations and are recomputed one at a time during the backward pass.
    fn forward_backward(
        &self,
        batch: &Batch,
        num_items: Option<i64>,
        train: bool,
        backward: bool,
    ) -> LossOutput {
        let input = CausalLMInput {
            input_ids: &batch.input_ids,
            attention_mask: if batch.has_padding {
                Some(&batch.attention_mask)
            } else {
                None
            },
            position_ids: batch.position_ids.as_ref(),
            seq_lens: batch.seq_lens.as_deref(),
        };
        let num_tokens = batch.attention_mask.sum(Kind::Int64).int64_value(&[]);
        let denom = num_items.unwrap_or(batch.num_loss_tokens).max(1) as f64;
        let recompute = backward && self.args.gradient_checkpointing;
        if !recompute {
            let hidden = if backward {
                self.model.forward_hidden(&input, None, train)
            } else {
                tch::no_grad(|| self.model.forward_hidden(&input, None, train))
            };
            let (loss, entropy, accuracy) =
                self.chunked_loss(&hidden, &batch.labels, denom, backward);
            return LossOutput {
                loss,
                entropy,
                accuracy,
                num_tokens,
            };
        }

        // Activation recompute: keep only each layer's input.
        let step_seed =
            tch::Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
        let ctx = self.model.layer_context(&input);
        let mut inputs = Vec::with_capacity(self.model.num_layers());
        let last = tch::no_grad(|| {
            let mut h = self.model.embed(&batch.input_ids);
            for i in 0..self.model.num_layers() {
                inputs.push(h.shallow_clone());
                // The same dropout masks in this pass and in the recompute.
                tch::manual_seed(step_seed.wrapping_add(i as i64));
                h = self.model.layer_forward(i, &h, &ctx, train);
            }
            h
        });
        let last = last.detach().set_requires_grad(true);
        let normed = self.model.final_norm(&last);
        let (loss, entropy, accuracy) = self.chunked_loss(&normed, &batch.labels, denom, true);
        let mut grad = last.grad();
        for i in (0..self.model.num_layers()).rev() {
            let x = inputs[i].detach().set_requires_grad(true);
            tch::manual_seed(step_seed.wrapping_add(i as i64));
            let y = self.model.layer_forward(i, &x, &ctx, train);
            (y * &grad).sum(Kind::Float).backward();
            grad = x.grad();
            inputs[i] = Tensor::new();
        }
        // Full fine-tuning also trains the embedding matrix.
        let embedded = self.model.embed(&batch.input_ids);
        if embedded.requires_grad() {
            (embedded * &grad).sum(Kind::Float).backward();
        }
        LossOutput {
            loss,
            entropy,
            accuracy,
            num_tokens,
        }
    }

    /// `lm_head` + cross-entropy over sequence chunks. Returns (loss, entropy,
    /// accuracy); with `backward`, gradients flow into `hidden`'s graph.
    ///
    /// # Shapes
    /// `hidden`: `[batch, seq, hidden]` (after the final norm); `labels`: `[batch, seq]`.
    fn chunked_loss(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        denom: f64,
        backward: bool,
    ) -> (f64, f64, f64) {
        let (b, t, _) = hidden
            .size3()
            .expect("hidden states are [batch, seq, hidden]");
        // Positions 0..t-1 predict labels 1..t.
        let positions = t - 1;
        let chunk = (self.loss_chunk_tokens / b.max(1)).max(1);
        // Chunks backpropagate into a detached copy; its gradient then flows back once.
        let leaf = hidden.detach().set_requires_grad(backward);
        let (mut loss, mut ent_sum, mut correct, mut valid_total) = (0.0, 0.0, 0.0, 0.0);
        let mut start = 0;
        while start < positions {
            let len = chunk.min(positions - start);
            let h = leaf.narrow(1, start, len);
            let y = labels.narrow(1, start + 1, len).reshape([-1]);
            let run = || {
                // Logits in fp32 whatever the model dtype, as transformers upcasts them.
                let logits = self.model.lm_head(&h).to_kind(Kind::Float);
                let v = logits.size()[2];
                // cross_entropy = log_softmax + nll_loss; keeping the log-probabilities
                // lets the entropy below reuse them instead of a second softmax.
                let logp = logits.reshape([-1, v]).log_softmax(-1, Kind::Float);
                let summed =
                    logp.nll_loss_nd::<Tensor>(&y, None, Reduction::Sum, IGNORE_INDEX) / denom;
                (logp, summed)
            };
            let (logp, chunk_loss) = if backward { run() } else { tch::no_grad(run) };
            tch::no_grad(|| {
                let valid = y.ne(IGNORE_INDEX);
                let valid_f = valid.to_kind(Kind::Float);
                let per_token = -(logp.exp() * &logp).sum_dim_intlist(-1, false, Kind::Float);
                ent_sum += (per_token * &valid_f).sum(Kind::Float).double_value(&[]);
                correct += logp
                    .argmax(-1, false)
                    .eq_tensor(&y)
                    .logical_and(&valid)
                    .sum(Kind::Float)
                    .double_value(&[]);
                valid_total += valid_f.sum(Kind::Float).double_value(&[]);
            });
            loss += chunk_loss.double_value(&[]);
            if backward {
                chunk_loss.backward();
            }
            start += len;
        }
        if backward && hidden.requires_grad() {
            (hidden * leaf.grad()).sum(Kind::Float).backward();
        }
        let entropy = ent_sum / valid_total.max(1.0);
        let accuracy = if valid_total > 0.0 {
            correct / valid_total
        } else {
            0.0
        };
        (loss, entropy, accuracy)
    }

    /// Runs the evaluation set and logs `eval_loss` & co. (transformers' `evaluate`).
    pub fn evaluate(&mut self) -> Result<Map<String, Value>, TrainerError> {
        let Some(eval) = &self.eval_dataset else {
            return Err(TrainerError::Invalid(
                "evaluation needs an eval_dataset".into(),
            ));
        };
        let start = Instant::now();
        let bs = self.args.per_device_eval_batch_size.max(1);
        let pad = self.pad_token_id();
        let n = eval.len();
        let (mut loss_sum, mut entropy_sum, mut accuracy_sum) = (0.0, 0.0, 0.0);
        let mut batches = 0usize;
        // Data parallel: batch i is evaluated by rank i % world_size, and the sums are combined.
        let (rank, world_size) = self.rank_and_world_size();
        let chunks: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(bs)
            .enumerate()
            .filter(|(i, _)| i % world_size == rank)
            .map(|(_, c)| c.to_vec())
            .collect();
        for idx in chunks {
            let examples: Vec<&TokenizedExample> = idx
                .iter()
                .map(|&i| &self.eval_dataset.as_ref().expect("checked")[i])
                .collect();
            let batch = collate_with(
                &examples,
                pad,
                self.args.pad_to_multiple_of,
                self.args.uses_padding_free(),
                self.device,
            );
            let out = self.forward_backward(&batch, None, false, false);
            // transformers repeats each batch's mean loss batch-size times, then averages.
            loss_sum += out.loss * idx.len() as f64;
            entropy_sum += out.entropy;
            accuracy_sum += out.accuracy;
            batches += 1;
            self.fire(Event::PredictionStep, Payload::None);
        }
        if let Some(group) = &self.process_group {
            let mut v = [loss_sum, entropy_sum, accuracy_sum, batches as f64];
            group.all_reduce_f64(&mut v, ReduceOp::Sum)?;
            (loss_sum, entropy_sum, accuracy_sum) = (v[0], v[1], v[2]);
            batches = v[3] as usize;
        }
        let runtime = start.elapsed().as_secs_f64().max(1e-9);
        let mean = |sum: f64| sum / batches.max(1) as f64;
        let mut metrics = Map::new();
        metrics.insert("eval_loss".into(), json!(loss_sum / n.max(1) as f64));
        metrics.insert("eval_runtime".into(), json!(round(runtime, 4)));
        metrics.insert(
            "eval_samples_per_second".into(),
            json!(round(n as f64 / runtime, 3)),
        );
        metrics.insert(
            "eval_steps_per_second".into(),
            json!(round(batches as f64 / runtime, 3)),
        );
        metrics.insert("eval_entropy".into(), json!(mean(entropy_sum)));
        metrics.insert("eval_mean_token_accuracy".into(), json!(mean(accuracy_sum)));
        metrics.insert(
            "eval_num_tokens".into(),
            json!(self.state.num_input_tokens_seen as f64),
        );
        self.log(metrics.clone());
        self.fire(Event::Evaluate, Payload::Metrics(&metrics));
        self.control.should_evaluate = false;
        Ok(metrics)
    }

    /// Appends an entry to `log_history` (with epoch and step), sends it to the
    /// trackers and to `on_log` (transformers' `Trainer.log`).
    pub fn log(&mut self, mut logs: Map<String, Value>) {
        if let Some(epoch) = self.state.epoch {
            logs.insert("epoch".into(), json!(epoch));
        }
        let mut entry = logs.clone();
        entry.insert("step".into(), json!(self.state.global_step));
        self.state.log_history.push(entry);
        let scalars: Vec<(String, f64)> = logs
            .iter()
            .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
            .collect();
        for t in &mut self.trackers {
            if let Err(e) = t.log_scalars(self.state.global_step as u64, &scalars) {
                eprintln!("warning: could not write a tracker log: {e}");
            }
        }
        self.fire(Event::Log, Payload::Logs(&logs));
        self.control.should_log = false;
    }

    fn maybe_log_save_evaluate(&mut self, output_dir: &Path) -> Result<(), TrainerError> {
        if self.control.should_log && self.state.global_step > self.loop_state.last_logged_step {
            let steps = (self.state.global_step - self.loop_state.last_logged_step) as f64;
            let w = std::mem::take(&mut self.loop_state.window);
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            let mut logs = Map::new();
            logs.insert("loss".into(), json!(w.loss_sum / steps));
            if let Some(g) = self.loop_state.last_grad_norm {
                logs.insert("grad_norm".into(), json!(g));
            }
            logs.insert("learning_rate".into(), json!(self.current_lr));
            logs.insert("entropy".into(), json!(mean(&w.entropy)));
            logs.insert("mean_token_accuracy".into(), json!(mean(&w.accuracy)));
            logs.insert(
                "num_tokens".into(),
                json!(self.state.num_input_tokens_seen as f64),
            );
            self.loop_state.last_logged_step = self.state.global_step;
            self.log(logs);
        }
        let mut metrics = None;
        let evaluated_or_saved = self.control.should_evaluate || self.control.should_save;
        if self.control.should_evaluate {
            if self.eval_dataset.is_some() {
                metrics = Some(self.evaluate()?);
            } else {
                self.control.should_evaluate = false;
            }
        }
        if self.control.should_save {
            self.save_checkpoint(output_dir, metrics.as_ref())?;
        }
        if evaluated_or_saved {
            release_free_memory();
        }
        Ok(())
    }

    /// Calls every callback's method for `event`, then forwards any text they produced.
    fn fire(&mut self, event: Event, payload: Payload) {
        let mut ctx = CallbackContext {
            model: &self.model,
            processing_class: &self.processing_class,
            logs: None,
            metrics: None,
            checkpoint_dir: None,
            text_logs: Vec::new(),
        };
        match payload {
            Payload::None => {}
            Payload::Logs(l) => ctx.logs = Some(l),
            Payload::Metrics(m) => ctx.metrics = Some(m),
            Payload::Checkpoint(p) => ctx.checkpoint_dir = Some(p),
        }
        let (args, state, control) = (&self.args, &self.state, &mut self.control);
        match event {
            // The handler resets per-step flags before the callbacks run, as transformers does.
            Event::StepBegin => {
                control.should_log = false;
                control.should_evaluate = false;
                control.should_save = false;
            }
            Event::EpochBegin => control.should_epoch_stop = false,
            Event::TrainBegin => control.should_training_stop = false,
            _ => {}
        }
        for cb in self.callbacks.iter_mut() {
            match event {
                Event::InitEnd => cb.on_init_end(args, state, control, &mut ctx),
                Event::TrainBegin => cb.on_train_begin(args, state, control, &mut ctx),
                Event::TrainEnd => cb.on_train_end(args, state, control, &mut ctx),
                Event::EpochBegin => cb.on_epoch_begin(args, state, control, &mut ctx),
                Event::EpochEnd => cb.on_epoch_end(args, state, control, &mut ctx),
                Event::StepBegin => cb.on_step_begin(args, state, control, &mut ctx),
                Event::SubstepEnd => cb.on_substep_end(args, state, control, &mut ctx),
                Event::PreOptimizerStep => cb.on_pre_optimizer_step(args, state, control, &mut ctx),
                Event::OptimizerStep => cb.on_optimizer_step(args, state, control, &mut ctx),
                Event::StepEnd => cb.on_step_end(args, state, control, &mut ctx),
                Event::Evaluate => cb.on_evaluate(args, state, control, &mut ctx),
                Event::PredictionStep => cb.on_prediction_step(args, state, control, &mut ctx),
                Event::Save => cb.on_save(args, state, control, &mut ctx),
                Event::Log => cb.on_log(args, state, control, &mut ctx),
            }
        }
        let step = self.state.global_step as u64;
        for (tag, text) in ctx.text_logs {
            for t in &mut self.trackers {
                if let Err(e) = t.log_text(step, &tag, &text) {
                    eprintln!("warning: could not write a tracker text log: {e}");
                }
            }
        }
    }

    /// Writes the final model: the adapter (PEFT format) or full weights, plus
    /// the tokenizer (transformers' `trainer.save_model(output_dir)`).
    /// Only rank 0 writes (the others return at once), as in transformers.
    pub fn save_model(&self, dir: Option<&Path>) -> Result<(), TrainerError> {
        if !self.is_world_process_zero() {
            return Ok(());
        }
        let dir = dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&self.args.output_dir));
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        match &self.peft {
            Some(adapter) => adapter.save_pretrained(&dir)?,
            None => self.model.save_pretrained(&dir).map_err(io_err(&dir))?,
        }
        self.processing_class.save_pretrained(&dir).map_err(|e| {
            TrainerError::Checkpoint(format!("saving the tokenizer to {}: {e}", dir.display()))
        })?;
        Ok(())
    }
}
