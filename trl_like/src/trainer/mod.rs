//! The training loop shared by every trainer, and `SFTTrainer` on top of it.
//!
//! [`Trainer`] is transformers' `Trainer`: a model-agnostic recipe that reads
//! top to bottom in [`Trainer::train`] — prepare the output directory, plan
//! the steps, set up the optimizer and schedule, resume, set up the trackers,
//! run the epochs, finish. Each optimizer step accumulates
//! `gradient_accumulation_steps` micro-batches whose summed token losses are
//! divided by the token count of the whole window, clips, steps, and lets the
//! callbacks decide when to log, evaluate and save; checkpoints hold all that
//! is needed to resume exactly where a run stopped.
//!
//! What differs between trainers — turning rows into batches and a batch into
//! a loss — is a [`TrainingHooks`] implementation: [`sft::SFTHooks`] is TRL's
//! `SFTTrainer` (`compute_loss` = causal-LM cross-entropy, [`loss`]), and
//! [`SFTTrainer`] is `Trainer<M, SFTHooks>` built with [`SFTTrainer::builder`].

pub mod callbacks;
pub mod checkpoint;
pub mod dpo;
mod errors;
mod evaluate;
mod fault;
mod flos;
pub mod hooks;
pub mod loss;
pub mod output_dir;
mod packing;
mod parallel;
mod report;
mod sampler;
pub mod sft;
pub mod state;
mod step;
mod zero;

pub use callbacks::{
    CallbackContext, CallbackHandler, DefaultFlowCallback, EarlyStoppingCallback, Event, Payload,
    PrinterCallback, ProgressCallback, TrainerCallback,
};
pub use dpo::{DPOHooks, DPOTrainer, DPOTrainerBuilder};
pub(crate) use errors::io_err;
pub use errors::TrainerError;
pub use hooks::{LossOutput, TrainingHooks};
pub use loss::LOSS_CHUNK_TOKENS;
pub use packing::prepare_and_pack;
pub use sft::{
    prepare_dataset, FormattingError, FormattingFunc, PrepareStats, SFTHooks, SFTTrainer,
    SFTTrainerBuilder,
};
pub use state::{StateFileError, TrainerControl, TrainerState};

use crate::distributed::ProcessGroup;
use crate::modeling::PreTrainedModel;
use crate::optim::{decay_groups, AdamW, LrScheduler, TrainOptimizer};
use crate::peft::PeftAdapter;
use crate::tokenizer::PreTrainedTokenizer;
use crate::tracking::{make_trackers, plot_training_curves, Tracker};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// Returned by [`Trainer::train`] (transformers' `TrainOutput`).
#[derive(Debug, Clone)]
pub struct TrainOutput {
    pub global_step: usize,
    pub training_loss: f64,
    pub metrics: Map<String, Value>,
}

/// The training loop over a model `M`, with the trainer-specific parts in `H`.
pub struct Trainer<M: PreTrainedModel, H: TrainingHooks<M>> {
    pub model: M,
    /// The trainer's config (`SFTConfig`, `DPOConfig`); the loop reads its
    /// shared [`crate::config::TrainingArguments`] through `Deref`.
    pub args: H::Args,
    pub processing_class: PreTrainedTokenizer,
    pub train_dataset: Vec<H::Example>,
    pub eval_dataset: Option<Vec<H::Example>>,
    /// The adapters being trained (`None` for full fine-tuning).
    pub peft: Option<PeftAdapter>,
    pub state: TrainerState,
    pub control: TrainerControl,
    /// The step at which an interrupt stopped training, if one did.
    pub interrupted_at: Option<usize>,
    /// Collation and loss of this kind of trainer.
    pub hooks: H,
    callback_handler: CallbackHandler,
    trackers: Vec<Box<dyn Tracker>>,
    /// Trainable tensors by name: adapter weights, or every base weight.
    params: Vec<(String, Tensor)>,
    loop_state: step::LoopState,
    device: Device,
    /// Set from outside (e.g. a Ctrl-C handler) to stop after the current step with a checkpoint.
    interrupt: Arc<AtomicBool>,
    /// Give up after this many non-finite steps in a row.
    max_nonfinite_steps: usize,
    /// The data-parallel process group under torchrun (`None`: one process).
    process_group: Option<ProcessGroup>,
    /// What checkpoints record to check a resume against (set by `train`).
    run_record: Option<output_dir::RunRecord>,
    /// The parameters `total_flos` counts per token (all but the embeddings).
    non_embedding_params: i64,
}

/// The step arithmetic of a run (transformers' `_inner_training_loop` preamble).
struct StepPlan {
    steps_per_epoch: usize,
    max_steps: usize,
    num_epochs: usize,
}

/// The optimizer and learning-rate schedule of a run (`create_optimizer_and_scheduler`).
struct Optimization {
    optimizer: TrainOptimizer,
    scheduler: LrScheduler,
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// Wires a trainer from prepared datasets: freezes the base when
    /// `peft` carries adapters (only they train), or trains every base weight,
    /// and installs the default callbacks before `callbacks`.
    pub fn new(
        mut model: M,
        args: H::Args,
        datasets: (Vec<H::Example>, Option<Vec<H::Example>>),
        processing_class: PreTrainedTokenizer,
        peft: Option<PeftAdapter>,
        hooks: H,
        callbacks: Vec<Box<dyn TrainerCallback>>,
    ) -> Self {
        let device = model.device();
        model.set_activation_checkpointing(args.gradient_checkpointing);
        let params = trainable_params(&model, peft.as_ref());
        model.fuse_frozen_projections();
        let mut handler = CallbackHandler::new(vec![Box::new(DefaultFlowCallback)]);
        if args.disable_tqdm {
            handler.add(Box::new(PrinterCallback));
        } else {
            handler.add(Box::new(ProgressCallback::default()));
        }
        callbacks.into_iter().for_each(|cb| handler.add(cb));
        let mut trainer = Self {
            model,
            args,
            processing_class,
            train_dataset: datasets.0,
            eval_dataset: datasets.1,
            peft,
            state: TrainerState::default(),
            control: TrainerControl::default(),
            interrupted_at: None,
            hooks,
            callback_handler: handler,
            trackers: Vec::new(),
            params,
            loop_state: step::LoopState::default(),
            device,
            interrupt: Arc::new(AtomicBool::new(false)),
            max_nonfinite_steps: 5,
            process_group: None,
            run_record: None,
            non_embedding_params: 0,
        };
        trainer.non_embedding_params = trainer.non_embedding_parameters();
        trainer.fire(Event::InitEnd, Payload::None);
        trainer
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

    /// Adds a callback (transformers' `add_callback`).
    pub fn add_callback(&mut self, callback: Box<dyn TrainerCallback>) {
        self.callback_handler.add(callback);
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

    /// Runs the training loop; resumes when `resume_from_checkpoint` says so.
    pub fn train(&mut self) -> Result<TrainOutput, TrainerError> {
        let output_dir = PathBuf::from(&self.args.output_dir);
        let (_lock, resume) =
            output_dir::prepare(&self.args, &output_dir, self.is_world_process_zero())?;
        // No rank may see another's first files as an "existing output directory".
        self.barrier()?;
        std::fs::create_dir_all(&output_dir).map_err(io_err(&output_dir))?;

        let plan = self.plan_steps()?;
        let mut run = self.setup_optimization(&plan)?;
        self.resume(resume.as_deref(), &mut run)?;
        self.setup_trackers(&output_dir)?;
        self.print_run_header(&plan);

        let start = (Instant::now(), self.state.global_step);
        let tokens_at_start = self.state.num_input_tokens_seen;
        self.fire(Event::TrainBegin, Payload::None);
        if self.args.eval_on_start && start.1 == 0 {
            self.evaluate()?;
        }
        self.run_epochs(&plan, &mut run, &output_dir)?;
        self.check_ranks_in_sync()?;
        self.load_best_at_end()?;
        let metrics = self.train_metrics(start, tokens_at_start);
        self.finish(&output_dir, metrics)
    }

    /// Optimizer steps, epochs and the initial [`TrainerState`] of this run.
    fn plan_steps(&mut self) -> Result<StepPlan, TrainerError> {
        let batches_per_epoch = self.num_batches_per_epoch();
        if batches_per_epoch == 0 {
            return Err(TrainerError::Invalid(format!(
                "the training set has {} examples, fewer than one batch of {} with dataloader_drop_last",
                self.train_dataset.len(),
                self.args.per_device_train_batch_size
            )));
        }
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
        Ok(StepPlan {
            steps_per_epoch,
            max_steps,
            num_epochs,
        })
    }

    /// AdamW over the trainable tensors (no weight decay on biases and norms)
    /// and the learning-rate schedule.
    fn setup_optimization(&mut self, plan: &StepPlan) -> Result<Optimization, TrainerError> {
        let optimizer = match self.zero_optimizer()? {
            Some(zero) => TrainOptimizer::Zero(zero),
            None => {
                let groups = decay_groups(
                    self.params
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect(),
                    self.args.weight_decay,
                );
                TrainOptimizer::Plain(AdamW::new(
                    groups,
                    (self.args.adam_beta1, self.args.adam_beta2),
                    self.args.adam_epsilon,
                ))
            }
        };
        let scheduler = LrScheduler::new(
            self.args.lr_scheduler_type.as_str(),
            self.args.learning_rate,
            self.args.get_warmup_steps(plan.max_steps),
            plan.max_steps,
            &self.args.lr_scheduler_kwargs,
        )?;
        self.loop_state = step::LoopState::default();
        self.interrupted_at = None;
        self.interrupt.store(false, Ordering::SeqCst);
        Ok(Optimization {
            optimizer,
            scheduler,
        })
    }

    /// Loads `checkpoint` (weights, optimizer, progress) if there is one, then
    /// gives every rank rank 0's trainable weights (DDP's start).
    fn resume(
        &mut self,
        checkpoint: Option<&Path>,
        run: &mut Optimization,
    ) -> Result<(), TrainerError> {
        // Taken before a checkpoint's weights are loaded (see make_run_record).
        self.run_record = Some(self.make_run_record());
        if let Some(dir) = checkpoint {
            self.load_checkpoint(dir, &mut run.optimizer)?;
            log::info!(
                "resuming from {} at step {}",
                dir.display(),
                self.state.global_step
            );
        }
        self.broadcast_parameters()
    }

    /// TensorBoard / JSONL writers under `output_dir/runs` (rank 0 only).
    fn setup_trackers(&mut self, output_dir: &Path) -> Result<(), TrainerError> {
        let logging_dir = output_dir.join("runs");
        let run_name = self.args.run_name.clone().unwrap_or_default();
        self.trackers = if self.is_world_process_zero() {
            make_trackers(&self.args.report_to, &logging_dir, &run_name)?
        } else {
            Vec::new()
        };
        Ok(())
    }

    /// The epochs and their optimizer steps, from where a resumed run stopped.
    fn run_epochs(
        &mut self,
        plan: &StepPlan,
        run: &mut Optimization,
        output_dir: &Path,
    ) -> Result<(), TrainerError> {
        let ga = self.args.gradient_accumulation_steps.max(1);
        let start_step = self.state.global_step;
        // A checkpoint at (or past) max_steps has nothing left to train.
        let first_epoch = if start_step >= plan.max_steps {
            plan.num_epochs
        } else {
            start_step / plan.steps_per_epoch
        };
        // transformers' ignore_data_skip: the resumed epoch restarts from its first batch.
        let mut skip_steps = if self.args.ignore_data_skip {
            0
        } else {
            start_step % plan.steps_per_epoch
        };
        for epoch in first_epoch..plan.num_epochs {
            self.fire(Event::EpochBegin, Payload::None);
            let batches = self.epoch_batches(epoch);
            for (window_idx, window) in batches.chunks(ga).enumerate() {
                if skip_steps > 0 {
                    skip_steps -= 1;
                    continue;
                }
                let position = step::WindowPosition {
                    epoch,
                    window_idx,
                    batches_in_epoch: batches.len(),
                };
                let interrupted = self.training_step(window, position, run)?;
                self.fire(Event::StepEnd, Payload::None);
                if interrupted && !self.control.should_training_stop {
                    self.stop_for_interrupt();
                }
                self.maybe_log_save_evaluate(output_dir, &run.optimizer)?;
                fault::crash_point("TRL_LIKE_CRASH_AFTER_STEP", self.state.global_step);
                if self.control.should_epoch_stop || self.control.should_training_stop {
                    break;
                }
            }
            self.fire(Event::EpochEnd, Payload::None);
            self.maybe_log_save_evaluate(output_dir, &run.optimizer)?;
            if self.control.should_training_stop {
                break;
            }
        }
        Ok(())
    }

    /// An interrupt finishes like a planned end: log, checkpoint (whatever
    /// `save_strategy` says: the rerun resumes from it), stop.
    fn stop_for_interrupt(&mut self) {
        self.control.should_training_stop = true;
        self.control.should_save = true;
        self.control.should_log = true;
        self.interrupted_at = Some(self.state.global_step);
    }

    /// `load_best_model_at_end`: the weights of the best checkpoint.
    fn load_best_at_end(&mut self) -> Result<(), TrainerError> {
        if !self.args.load_best_model_at_end {
            return Ok(());
        }
        if let Some(best) = self.state.best_model_checkpoint.clone() {
            log::info!(
                "loading the best checkpoint {best} (metric {:?})",
                self.state.best_metric
            );
            self.load_weights(Path::new(&best))?;
        }
        Ok(())
    }

    /// Logs the closing metrics, then (rank 0) writes `trainer_state.json`
    /// — unless interrupted: then only the checkpoint says where the run is —,
    /// the loss curves, and flushes the trackers.
    fn finish(
        &mut self,
        output_dir: &Path,
        metrics: Map<String, Value>,
    ) -> Result<TrainOutput, TrainerError> {
        self.log(metrics.clone());
        self.fire(Event::TrainEnd, Payload::None);
        if self.is_world_process_zero() {
            if self.interrupted_at.is_none() {
                self.state
                    .save_to_json(&output_dir.join("trainer_state.json"), &self.control)
                    .map_err(io_err(output_dir))?;
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
            training_loss: self.train_loss(),
            metrics,
        })
    }

    /// Calls every callback for `event`, then forwards any text they produced
    /// to the trackers.
    fn fire(&mut self, event: Event, payload: Payload) {
        let mut ctx = CallbackContext {
            model: &self.model,
            processing_class: &self.processing_class,
            logs: None,
            metrics: None,
            checkpoint_dir: None,
            text_logs: Vec::new(),
        };
        self.callback_handler.call_event(
            event,
            payload,
            &self.args,
            &self.state,
            &mut self.control,
            &mut ctx,
        );
        let step = self.state.global_step as u64;
        for (tag, text) in ctx.text_logs {
            for t in &mut self.trackers {
                if let Err(e) = t.log_text(step, &tag, &text) {
                    log::warn!("could not write a tracker text log: {e}");
                }
            }
        }
    }
}

/// The tensors the optimizer trains. With adapters the base is frozen, as
/// PEFT does (backward then never computes its weight gradients); without,
/// every base weight trains.
fn trainable_params<M: PreTrainedModel>(
    model: &M,
    peft: Option<&PeftAdapter>,
) -> Vec<(String, Tensor)> {
    match peft {
        Some(adapter) => {
            for (_, t) in model.named_parameters() {
                let _ = t.set_requires_grad(false);
            }
            let params = adapter.named_parameters();
            if model.is_quantized() {
                // TRL 1.16's SFTTrainer casts the adapters of a quantized (QLoRA) base to bf16
                // whatever `bf16` says (QLoRA paper, section 3); the layers share these tensors.
                for (_, t) in &params {
                    tch::no_grad(|| t.shallow_clone().set_data(&t.to_kind(tch::Kind::BFloat16)));
                }
            }
            params
        }
        None => model
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (n, t.set_requires_grad(true)))
            .collect(),
    }
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

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
