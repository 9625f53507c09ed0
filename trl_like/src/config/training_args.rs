//! `TrainingArguments`: the transformers 5.23 `TrainingArguments` fields this
//! trainer can act on, shared by every TRL config ([`super::SFTConfig`],
//! [`super::DPOConfig`]) which embed it flattened (one YAML key / flag per
//! field) and deref to it, so `args.learning_rate` reads the same on each.
//!
//! `Default` is transformers' defaults; the TRL configs override a few the way
//! TRL does (`learning_rate`, `logging_steps` 10, `gradient_checkpointing` on,
//! `bf16` unset = on unless `fp16` is set).
//! The step arithmetic (`logging_steps` & co. below 1 are ratios of the total
//! number of optimizer steps, the warmup length, the number of steps per
//! epoch) is transformers' to the rounding.

use serde_json::{Map, Value};
use std::path::PathBuf;

use super::{check_at_least_one, check_finite, check_unit_interval, ConfigError};

config_enum! {
    /// The learning-rate schedule after warmup (transformers' `SchedulerType`).
    pub enum SchedulerType {
        /// Linear decay from the peak to 0.
        Linear = "linear",
        /// Half a cosine from the peak to 0 (`num_cycles` in `lr_scheduler_kwargs`, default 0.5).
        Cosine = "cosine",
        /// Cosine with hard restarts (`num_cycles`, default 1).
        CosineWithRestarts = "cosine_with_restarts",
        /// Polynomial decay to `lr_end` (`power`, `lr_end` in `lr_scheduler_kwargs`).
        Polynomial = "polynomial",
        /// Constant, no warmup.
        Constant = "constant",
        /// Constant after a linear warmup.
        ConstantWithWarmup = "constant_with_warmup",
        /// Cosine decay to `min_lr` or `min_lr_rate` (one of them is required in `lr_scheduler_kwargs`).
        CosineWithMinLr = "cosine_with_min_lr",
    }
}

config_enum! {
    /// When to log or evaluate (transformers' `IntervalStrategy`).
    pub enum IntervalStrategy {
        No = "no",
        Steps = "steps",
        Epoch = "epoch",
    }
}

config_enum! {
    /// When to write a checkpoint (transformers' `SaveStrategy`).
    pub enum SaveStrategy {
        No = "no",
        Steps = "steps",
        Epoch = "epoch",
        /// Whenever `metric_for_best_model` reaches a new best value.
        Best = "best",
    }
}

config_enum! {
    /// The optimizer. Both names select the same decoupled-weight-decay AdamW
    /// (`torch.optim.AdamW` math); the fused kernel is a speed detail of PyTorch.
    pub enum OptimizerName {
        AdamwTorch = "adamw_torch",
        AdamwTorchFused = "adamw_torch_fused",
    }
}

config_enum! {
    /// The order training samples are drawn in (transformers' `train_sampling_strategy`).
    pub enum SamplingStrategy {
        /// Shuffled every epoch.
        Random = "random",
        /// Dataset order.
        Sequential = "sequential",
        /// Shuffled, but batches hold samples of similar length (less padding).
        GroupByLength = "group_by_length",
    }
}

config_struct! {
    /// The training hyper-parameters every trainer shares (transformers'
    /// `TrainingArguments`). `Default` is transformers 5.23's defaults.
    ///
    /// `bf16` is `Option<bool>` as in TRL: unset means "on unless `fp16` is
    /// set"; read the resolved value with [`TrainingArguments::use_bf16`].
    pub struct TrainingArguments {
        /// Directory for checkpoints, logs and the final model.
        output_dir: String = "trainer_output".to_string(),
        /// transformers-4 option (removed in transformers 5), accepted so older configs parse:
        /// allow writing into an output_dir that already holds files.
        overwrite_output_dir: bool = false,
        /// How many passes over the training set (fractions allowed). Ignored when max_steps > 0.
        num_train_epochs: f64 = 3.0,
        /// Total optimizer steps; a positive value overrides num_train_epochs, -1 trains by epochs.
        max_steps: i64 = -1,
        /// Samples per device in one forward/backward pass during training.
        per_device_train_batch_size: usize = 8,
        /// Samples per device in one forward pass during evaluation.
        per_device_eval_batch_size: usize = 8,
        /// Micro-batches whose gradients are summed before each optimizer step
        /// (effective batch = per-device batch x devices x this).
        gradient_accumulation_steps: usize = 1,
        /// Normalise the loss by the token count summed over all devices (exact loss under data parallelism).
        average_tokens_across_devices: bool = true,
        /// Peak learning rate of the AdamW optimizer.
        learning_rate: f64 = 5e-5,
        /// Shape of the learning-rate schedule after warmup.
        lr_scheduler_type: SchedulerType = SchedulerType::Linear,
        /// Extra arguments of the schedule, e.g. {"num_cycles": 0.5} or {"min_lr_rate": 0.1};
        /// a YAML mapping or a JSON object string.
        lr_scheduler_kwargs: Map<String, Value> = Map::new(),
        /// Linear warmup from 0 to learning_rate: a whole number of steps, or a value in [0, 1)
        /// meaning that fraction of the total steps (rounded up).
        warmup_steps: f64 = 0.0,
        /// transformers-4 option (transformers 5 folded it into warmup_steps < 1): warmup as a
        /// fraction of the total steps, rounded up. Cannot be combined with a non-zero warmup_steps.
        warmup_ratio: Option<f64> = None,
        /// The optimizer (AdamW with decoupled weight decay either way).
        optim: OptimizerName = OptimizerName::AdamwTorchFused,
        /// Decoupled weight decay of AdamW (transformers exempts biases and norm weights).
        weight_decay: f64 = 0.0,
        /// AdamW's decay rate for the running mean of gradients.
        adam_beta1: f64 = 0.9,
        /// AdamW's decay rate for the running mean of squared gradients.
        adam_beta2: f64 = 0.999,
        /// AdamW's term added to the denominator for numerical stability.
        adam_epsilon: f64 = 1e-8,
        /// Clip the global gradient norm to this value before each step; 0 disables clipping.
        max_grad_norm: f64 = 1.0,
        /// Train in bfloat16 instead of float32. Unset (none) means on unless fp16 is set (TRL's rule).
        bf16: Option<bool> = Some(false),
        /// Train in float16 mixed precision.
        fp16: bool = false,
        /// Run evaluation fully in bfloat16 (faster, less memory).
        bf16_full_eval: bool = false,
        /// Run evaluation fully in float16.
        fp16_full_eval: bool = false,
        /// Recompute activations in the backward pass instead of keeping them: less memory,
        /// roughly a fifth slower. On by default in TRL's configs.
        #[alias = "activation_checkpointing"]
        gradient_checkpointing: bool = false,
        /// NEFTune: add uniform noise of this scale to the input embeddings while training
        /// (typical values 5-15); none disables it.
        neftune_noise_alpha: Option<f64> = None,
        /// When to log training metrics.
        logging_strategy: IntervalStrategy = IntervalStrategy::Steps,
        /// Log every N optimizer steps; a value in [0, 1) is a fraction of the total steps (rounded up).
        logging_steps: f64 = 500.0,
        /// Also log after the very first optimizer step.
        logging_first_step: bool = false,
        /// Leave NaN/Inf losses out of the logged averages (training itself is unaffected).
        logging_nan_inf_filter: bool = true,
        /// Hide progress bars.
        disable_tqdm: bool = false,
        /// Where to send metrics: a name or a list (e.g. tensorboard, jsonl, swanlab), "all", or "none".
        report_to: Vec<String> = Vec::new(),
        /// A name for this run, shown by the experiment trackers.
        run_name: Option<String> = None,
        /// When to evaluate on the held-out split.
        eval_strategy: IntervalStrategy = IntervalStrategy::No,
        /// Evaluate every N steps (eval_strategy steps); a value in [0, 1) is a fraction of the total
        /// steps (rounded up); none falls back to logging_steps.
        eval_steps: Option<f64> = None,
        /// Epochs or steps (following eval_strategy) to wait before the first evaluation.
        eval_delay: f64 = 0.0,
        /// Evaluate once before the first training step, as a sanity check.
        eval_on_start: bool = false,
        /// When to write checkpoints.
        save_strategy: SaveStrategy = SaveStrategy::Steps,
        /// Save every N steps (save_strategy steps); a value in [0, 1) is a fraction of the total
        /// steps (rounded up).
        save_steps: f64 = 500.0,
        /// Keep at most this many checkpoints in output_dir, deleting the oldest
        /// (the best one survives when load_best_model_at_end is on); none keeps all.
        save_total_limit: Option<usize> = None,
        /// Checkpoints hold only the model weights (no optimizer, scheduler or RNG state),
        /// so training cannot resume from them.
        save_only_model: bool = false,
        /// At the end of training, load the checkpoint with the best metric_for_best_model.
        /// Needs save_strategy equal to eval_strategy (or save_strategy best).
        load_best_model_at_end: bool = false,
        /// The evaluation metric that ranks checkpoints (default "loss" when needed).
        metric_for_best_model: Option<String> = None,
        /// Whether a larger metric_for_best_model is better; unset: false for names ending in "loss".
        greater_is_better: Option<bool> = None,
        /// Seed for initialisation, dropout and shuffling.
        seed: u64 = 42,
        /// Seed for the data order only; unset uses seed.
        data_seed: Option<u64> = None,
        /// Train on the CPU even when a GPU is available.
        use_cpu: bool = false,
        /// Process-group backend under torchrun: nccl or gloo; unset picks nccl on CUDA, gloo on CPU.
        ddp_backend: Option<String> = None,
        /// Seconds a rendezvous or collective may wait for the other ranks before failing.
        ddp_timeout: u64 = 1800,
        /// A DeepSpeed config (JSON/YAML) or an accelerate config of type DEEPSPEED (e.g.
        /// configs/zero2.yaml): ZeRO stage 0/1/2 with fp32 master weights; "auto" values follow the flags.
        deepspeed: Option<String> = None,
        /// Drop the last batch of an epoch when it is smaller than the batch size.
        dataloader_drop_last: bool = false,
        /// Order of training samples: random, sequential, or group_by_length.
        train_sampling_strategy: SamplingStrategy = SamplingStrategy::Random,
        /// transformers-4 option, accepted so older configs parse: the same as
        /// train_sampling_strategy group_by_length.
        group_by_length: bool = false,
        /// Resume from a checkpoint: a checkpoint directory, or "true" for the newest
        /// checkpoint-* in output_dir.
        resume_from_checkpoint: Option<String> = None,
        /// When resuming, do not skip the batches of the current epoch that the checkpoint's run
        /// already trained on (the epoch restarts from its first batch); this also lets a resume
        /// go ahead when the training data or the global batch changed.
        ignore_data_skip: bool = false,
    }
}

/// Where `resume_from_checkpoint` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The newest `checkpoint-*` directory in `output_dir`.
    Latest,
    /// This checkpoint directory.
    Path(PathBuf),
}

/// transformers' `int(steps)` for steps >= 1, `ceil(max_steps * steps)` below 1.
fn resolve_interval(steps: f64, max_steps: usize) -> usize {
    if steps < 1.0 {
        // Same IEEE product as Python's `max_steps * ratio`, so the rounding
        // matches, e.g. ceil(100 * 0.07) = ceil(7.000000000000001) = 8.
        (max_steps as f64 * steps).ceil().max(0.0) as usize
    } else {
        steps as usize
    }
}

impl TrainingArguments {
    /// The defaults TRL's configs give the shared arguments (`SFTConfig`,
    /// `DPOConfig`, …): their own `learning_rate`, `logging_steps` 10,
    /// `gradient_checkpointing` on, `bf16` unset (on unless `fp16` is set).
    pub fn trl_defaults(learning_rate: f64) -> Self {
        Self {
            learning_rate,
            logging_steps: 10.0,
            gradient_checkpointing: true,
            bf16: None,
            ..Self::default()
        }
    }

    /// bf16 after TRL's rule: unset means "on unless fp16 is set".
    pub fn use_bf16(&self) -> bool {
        self.bf16.unwrap_or(!self.fp16)
    }

    /// Samples per optimizer step across `num_devices` devices.
    pub fn total_train_batch_size(&self, num_devices: usize) -> usize {
        self.per_device_train_batch_size * self.gradient_accumulation_steps * num_devices.max(1)
    }

    /// Optimizer steps per epoch for a dataloader of `num_batches` micro-batches
    /// (transformers: `max(n // gas + int(n % gas > 0), 1)`).
    pub fn num_update_steps_per_epoch(&self, num_batches: usize) -> usize {
        let gas = self.gradient_accumulation_steps.max(1);
        num_batches.div_ceil(gas).max(1)
    }

    /// Total optimizer steps: `max_steps` when positive, else
    /// `ceil(num_train_epochs * steps_per_epoch)` as transformers computes it.
    pub fn total_training_steps(&self, num_batches: usize) -> usize {
        if self.max_steps > 0 {
            self.max_steps as usize
        } else {
            let steps = (self.num_train_epochs
                * self.num_update_steps_per_epoch(num_batches) as f64)
                .ceil();
            steps.max(0.0) as usize
        }
    }

    /// Warmup steps for a run of `num_training_steps` (transformers 5's
    /// `get_warmup_steps`: `int(warmup_steps)` when >= 1, else
    /// `ceil(num_training_steps * warmup_steps)`). A legacy `warmup_ratio`
    /// gives `ceil(num_training_steps * warmup_ratio)`.
    pub fn get_warmup_steps(&self, num_training_steps: usize) -> usize {
        match self.warmup_ratio {
            // transformers 4: `warmup_steps if warmup_steps > 0 else ceil(n * warmup_ratio)`.
            Some(ratio) if self.warmup_steps == 0.0 => {
                (num_training_steps as f64 * ratio).ceil().max(0.0) as usize
            }
            _ => resolve_interval(self.warmup_steps, num_training_steps),
        }
    }

    /// `eval_steps` after transformers' fallback: with `eval_strategy` steps,
    /// unset (or 0) takes `logging_steps`.
    pub fn effective_eval_steps(&self) -> Option<f64> {
        match self.eval_steps {
            Some(s) if s != 0.0 => Some(s),
            _ if self.eval_strategy == IntervalStrategy::Steps => Some(self.logging_steps),
            other => other,
        }
    }

    /// Log every this many optimizer steps in a run of `max_steps`
    /// (ratios below 1 resolved as transformers' `TrainerState.compute_steps`).
    pub fn resolved_logging_steps(&self, max_steps: usize) -> usize {
        resolve_interval(self.logging_steps, max_steps)
    }

    /// Evaluate every this many optimizer steps in a run of `max_steps`, after
    /// the fallback to `logging_steps`.
    pub fn resolved_eval_steps(&self, max_steps: usize) -> usize {
        resolve_interval(
            self.effective_eval_steps().unwrap_or(self.logging_steps),
            max_steps,
        )
    }

    /// Save every this many optimizer steps in a run of `max_steps`.
    pub fn resolved_save_steps(&self, max_steps: usize) -> usize {
        resolve_interval(self.save_steps, max_steps)
    }

    /// The metric that ranks checkpoints: `metric_for_best_model`, or "loss"
    /// when `load_best_model_at_end` is on (transformers' rule).
    pub fn resolved_metric_for_best_model(&self) -> Option<String> {
        match &self.metric_for_best_model {
            Some(m) => Some(m.clone()),
            None if self.load_best_model_at_end => Some("loss".to_string()),
            None => None,
        }
    }

    /// Whether a larger metric is better: `greater_is_better`, or false for a
    /// metric whose name ends in "loss", true otherwise.
    pub fn resolved_greater_is_better(&self) -> Option<bool> {
        self.greater_is_better.or_else(|| {
            self.resolved_metric_for_best_model()
                .map(|m| !m.ends_with("loss"))
        })
    }

    /// The sampling order, with the legacy `group_by_length` folded in.
    pub fn sampling_strategy(&self) -> SamplingStrategy {
        if self.group_by_length {
            SamplingStrategy::GroupByLength
        } else {
            self.train_sampling_strategy
        }
    }

    /// Whether `report_to` names this integration (or "all").
    pub fn reports_to(&self, integration: &str) -> bool {
        self.report_to
            .iter()
            .any(|r| r == integration || r == "all")
    }

    /// `resume_from_checkpoint` interpreted: "true" → the newest checkpoint,
    /// "false" or unset → none, anything else → that directory.
    pub fn resume_from(&self) -> Option<ResumeFrom> {
        match self.resume_from_checkpoint.as_deref() {
            None => None,
            Some(s) if s.eq_ignore_ascii_case("false") => None,
            Some(s) if s.eq_ignore_ascii_case("true") => Some(ResumeFrom::Latest),
            Some(s) => Some(ResumeFrom::Path(PathBuf::from(s))),
        }
    }

    /// Checks ranges and combinations (transformers' `_validate_args` rules
    /// plus the obvious ranges). The error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The order is part of the contract: with several mistakes, the first
        // one reported must not change between releases.
        self.validate_run_length_and_batches()?;
        self.validate_optimizer()?;
        self.validate_precision()?;
        self.validate_intervals()?;
        self.validate_integrations()
    }

    /// Output directory, how long to train, batch sizes and the process group.
    fn validate_run_length_and_batches(&self) -> Result<(), ConfigError> {
        if self.output_dir.trim().is_empty() {
            return Err(ConfigError::invalid("output_dir", "must not be empty"));
        }
        check_finite("num_train_epochs", self.num_train_epochs)?;
        if self.max_steps == 0 {
            return Err(ConfigError::invalid(
                "max_steps",
                "must be positive, or -1 to train for num_train_epochs; 0 would train nothing",
            ));
        }
        if self.max_steps < 0 && self.num_train_epochs <= 0.0 {
            return Err(ConfigError::invalid(
                "num_train_epochs",
                format!(
                    "must be > 0 when max_steps is not set, got {}",
                    self.num_train_epochs
                ),
            ));
        }
        check_at_least_one(
            "per_device_train_batch_size",
            self.per_device_train_batch_size,
        )?;
        if let Some(b) = &self.ddp_backend {
            if !["nccl", "gloo"].contains(&b.to_ascii_lowercase().as_str()) {
                return Err(ConfigError::invalid(
                    "ddp_backend",
                    format!("{b:?} is not one of nccl, gloo"),
                ));
            }
        }
        if self.ddp_timeout == 0 {
            return Err(ConfigError::invalid(
                "ddp_timeout",
                "must be at least 1 second",
            ));
        }
        check_at_least_one(
            "per_device_eval_batch_size",
            self.per_device_eval_batch_size,
        )?;
        check_at_least_one(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
        )?;
        Ok(())
    }

    /// Learning rate, optimizer hyper-parameters, warmup and scheduler.
    fn validate_optimizer(&self) -> Result<(), ConfigError> {
        check_finite("learning_rate", self.learning_rate)?;
        if self.learning_rate <= 0.0 {
            return Err(ConfigError::invalid(
                "learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            ));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("adam_epsilon", self.adam_epsilon),
            ("max_grad_norm", self.max_grad_norm),
            ("warmup_steps", self.warmup_steps),
            ("eval_delay", self.eval_delay),
        ] {
            check_finite(name, v)?;
            if v < 0.0 {
                return Err(ConfigError::invalid(name, format!("must be >= 0, got {v}")));
            }
        }
        check_unit_interval("adam_beta1", self.adam_beta1)?;
        check_unit_interval("adam_beta2", self.adam_beta2)?;
        if let Some(r) = self.warmup_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(ConfigError::invalid(
                    "warmup_ratio",
                    format!("must be in [0, 1], got {r}"),
                ));
            }
            if self.warmup_steps != 0.0 {
                return Err(ConfigError::conflict(
                    "warmup_ratio",
                    "warmup_steps",
                    "set only one (transformers 5 takes a ratio as warmup_steps < 1)",
                ));
            }
        }
        if self.lr_scheduler_type == SchedulerType::CosineWithMinLr
            && !self.lr_scheduler_kwargs.contains_key("min_lr")
            && !self.lr_scheduler_kwargs.contains_key("min_lr_rate")
        {
            return Err(ConfigError::invalid(
                "lr_scheduler_kwargs",
                "must set `min_lr` or `min_lr_rate` for lr_scheduler_type cosine_with_min_lr",
            ));
        }
        Ok(())
    }

    /// Mixed-precision flags that exclude each other, and embedding noise.
    fn validate_precision(&self) -> Result<(), ConfigError> {
        if self.fp16 && self.use_bf16() {
            return Err(ConfigError::conflict(
                "fp16",
                "bf16",
                "at most one of fp16 and bf16 can be true",
            ));
        }
        if self.fp16_full_eval && self.bf16_full_eval {
            return Err(ConfigError::conflict(
                "fp16_full_eval",
                "bf16_full_eval",
                "at most one of fp16_full_eval and bf16_full_eval can be true",
            ));
        }
        if let Some(alpha) = self.neftune_noise_alpha {
            check_finite("neftune_noise_alpha", alpha)?;
            if alpha < 0.0 {
                return Err(ConfigError::invalid(
                    "neftune_noise_alpha",
                    format!("must be >= 0, got {alpha}"),
                ));
            }
        }
        Ok(())
    }

    /// Logging, evaluation and saving cadence, and best-model selection.
    fn validate_intervals(&self) -> Result<(), ConfigError> {
        // Step intervals: transformers requires whole numbers above 1 and a
        // non-zero value for a "steps" strategy; below 1 is a ratio.
        check_interval(
            "logging_steps",
            self.logging_steps,
            self.logging_strategy == IntervalStrategy::Steps,
        )?;
        if let Some(e) = self.eval_steps {
            check_interval("eval_steps", e, false)?;
        }
        if self.eval_strategy == IntervalStrategy::Steps {
            if let Some(e) = self.effective_eval_steps() {
                let field = if self.eval_steps.is_some_and(|e| e != 0.0) {
                    "eval_steps"
                } else {
                    "logging_steps"
                };
                check_interval(field, e, true)?;
            }
        }
        check_interval(
            "save_steps",
            self.save_steps,
            self.save_strategy == SaveStrategy::Steps,
        )?;
        if let Some(limit) = self.save_total_limit {
            check_at_least_one("save_total_limit", limit)?;
        }
        self.validate_best_model()
    }

    /// Integrations and resuming.
    fn validate_integrations(&self) -> Result<(), ConfigError> {
        if self.report_to.len() > 1 && self.report_to.iter().any(|r| r == "none") {
            return Err(ConfigError::invalid(
                "report_to",
                "\"none\" cannot be combined with other integrations",
            ));
        }
        if let Some(p) = &self.resume_from_checkpoint {
            if p.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "resume_from_checkpoint",
                    "must be a directory or \"true\"",
                ));
            }
        }
        Ok(())
    }

    fn validate_best_model(&self) -> Result<(), ConfigError> {
        if self.save_strategy == SaveStrategy::Best && self.eval_strategy == IntervalStrategy::No {
            return Err(ConfigError::conflict(
                "save_strategy",
                "eval_strategy",
                "save_strategy \"best\" needs evaluations to rank checkpoints; set eval_strategy",
            ));
        }
        if !self.load_best_model_at_end || self.save_strategy == SaveStrategy::Best {
            return Ok(());
        }
        if self.eval_strategy.as_str() != self.save_strategy.as_str() {
            return Err(ConfigError::conflict(
                "load_best_model_at_end",
                "save_strategy",
                format!(
                    "load_best_model_at_end needs save_strategy equal to eval_strategy (or save_strategy \"best\"), \
                     got eval_strategy {} and save_strategy {}",
                    self.eval_strategy, self.save_strategy
                ),
            ));
        }
        if self.eval_strategy == IntervalStrategy::Steps {
            let (save, eval) = (
                self.save_steps,
                self.effective_eval_steps().unwrap_or(self.logging_steps),
            );
            if save % eval != 0.0 {
                let ok = if eval < 1.0 || save < 1.0 {
                    // transformers compares ratios scaled by 1e6 to dodge float error.
                    eval < 1.0 && save < 1.0 && ((save * 1e6) % (eval * 1e6)) == 0.0
                } else {
                    false
                };
                if !ok {
                    return Err(ConfigError::conflict(
                        "load_best_model_at_end",
                        "save_steps",
                        format!("save_steps ({save}) must be a multiple of eval_steps ({eval}) (both steps or both ratios)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A step interval: >= 0, whole when above 1, non-zero when its strategy is "steps".
fn check_interval(field: &'static str, v: f64, required: bool) -> Result<(), ConfigError> {
    check_finite(field, v)?;
    if v < 0.0 {
        return Err(ConfigError::invalid(
            field,
            format!("must be >= 0, got {v}"),
        ));
    }
    if required && v == 0.0 {
        return Err(ConfigError::invalid(
            field,
            "must be non-zero with the \"steps\" strategy",
        ));
    }
    if v > 1.0 && v.fract() != 0.0 {
        return Err(ConfigError::invalid(
            field,
            format!(
                "must be a whole number of steps, or a ratio in [0, 1) of the total steps; got {v}"
            ),
        ));
    }
    Ok(())
}

/// What TRL's configs (SFTConfig, DPOConfig) accept before type coercion:
/// their own `pad_to_multiple_of: auto`, then the shared fields' spellings.
pub(crate) fn trl_preprocess(field: &str, value: Value) -> Value {
    match (field, value) {
        // TRL: "auto" pads to 128 on AWS Neuron only, so nothing here.
        ("pad_to_multiple_of", Value::String(s)) if s.eq_ignore_ascii_case("auto") => Value::Null,
        (f, v) => preprocess(f, v),
    }
}

/// Spellings of the shared fields applied before type coercion (the TRL
/// configs' `ConfigGroup::preprocess`).
pub(crate) fn preprocess(field: &str, value: Value) -> Value {
    match (field, value) {
        // transformers: report_to "none" means no integration.
        ("report_to", Value::String(s)) if s.eq_ignore_ascii_case("none") => Value::Array(vec![]),
        ("report_to", Value::Array(a))
            if a.len() == 1
                && a[0]
                    .as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case("none")) =>
        {
            Value::Array(vec![])
        }
        ("report_to", Value::Null) => Value::Array(vec![]),
        // TRL: "auto" pads to 128 on AWS Neuron only, so nothing here.
        ("pad_to_multiple_of", Value::String(s)) if s.eq_ignore_ascii_case("auto") => Value::Null,
        // A YAML boolean: true resumes from the newest checkpoint.
        ("resume_from_checkpoint", Value::Bool(true)) => Value::String("true".into()),
        ("resume_from_checkpoint", Value::Bool(false)) => Value::Null,
        (_, v) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_turns_the_bf16_default_off() {
        let c = TrainingArguments {
            fp16: true,
            ..Default::default()
        };
        assert!(!c.use_bf16());
        assert_eq!(c.validate(), Ok(()));
        let c = TrainingArguments {
            fp16: true,
            bf16: Some(true),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), "fp16");
    }

    #[test]
    fn interval_rules() {
        let bad = TrainingArguments {
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(1.5),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "eval_steps");
        let ok = TrainingArguments {
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(3.0),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        // eval_steps is checked even when unused, as a typo guard.
        let bad = TrainingArguments {
            eval_steps: Some(2.5),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "eval_steps");
        let bad = TrainingArguments {
            logging_steps: 0.0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "logging_steps");
        let ok = TrainingArguments {
            logging_steps: 0.0,
            logging_strategy: IntervalStrategy::No,
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad = TrainingArguments {
            save_steps: -1.0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "save_steps");
    }

    #[test]
    fn load_best_model_rules() {
        // transformers: strategies must match unless save_strategy is "best".
        let c = TrainingArguments {
            load_best_model_at_end: true,
            ..Default::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Conflict {
                field: "load_best_model_at_end",
                ..
            })
        ));
        let c = TrainingArguments {
            load_best_model_at_end: true,
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(100.0),
            save_steps: 250.0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = TrainingArguments {
            save_steps: 300.0,
            ..c
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.resolved_metric_for_best_model().as_deref(), Some("loss"));
        assert_eq!(c.resolved_greater_is_better(), Some(false));
        // Ratios (each case checked against TrainingArguments 5.23): 0.2 is a multiple of 0.1.
        let c = TrainingArguments {
            eval_steps: Some(0.1),
            save_steps: 0.2,
            ..c
        };
        assert_eq!(c.validate(), Ok(()));
        // 0.3 % 0.1 is 0.09999999999999998 in floats; the 1e6 scaling makes it 0.
        let c = TrainingArguments {
            save_steps: 0.3,
            ..c
        };
        assert_eq!(c.validate(), Ok(()));
        let c = TrainingArguments {
            save_steps: 0.25,
            ..c
        };
        assert!(c.validate().is_err());
        // Mixing a ratio and a step count is refused.
        let c = TrainingArguments {
            save_steps: 100.0,
            ..c
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn resume_from() {
        let mut c = TrainingArguments::default();
        assert_eq!(c.resume_from(), None);
        c.resume_from_checkpoint = Some("true".into());
        assert_eq!(c.resume_from(), Some(ResumeFrom::Latest));
        c.resume_from_checkpoint = Some("out/checkpoint-10".into());
        assert_eq!(
            c.resume_from(),
            Some(ResumeFrom::Path("out/checkpoint-10".into()))
        );
    }

    #[test]
    fn group_by_length_legacy_flag() {
        let c = TrainingArguments {
            group_by_length: true,
            ..Default::default()
        };
        assert_eq!(c.sampling_strategy(), SamplingStrategy::GroupByLength);
        assert_eq!(
            TrainingArguments::default().sampling_strategy(),
            SamplingStrategy::Random
        );
    }

    #[test]
    fn cosine_with_min_lr_needs_a_floor() {
        let mut c = TrainingArguments {
            lr_scheduler_type: SchedulerType::CosineWithMinLr,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field(), "lr_scheduler_kwargs");
        c.lr_scheduler_kwargs
            .insert("min_lr_rate".into(), 0.1.into());
        assert_eq!(c.validate(), Ok(()));
    }
}
