//! `TrainerCallback`: hooks into the training loop with transformers' events,
//! arguments and order, plus the built-in callbacks (`DefaultFlowCallback`,
//! `ProgressCallback`, `PrinterCallback`, `EarlyStoppingCallback`).

use super::state::{TrainerControl, TrainerState};
use crate::config::{IntervalStrategy, SFTConfig, SaveStrategy};
use crate::modeling::CausalLM;
use crate::tokenizer::PreTrainedTokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::path::Path;

/// What a callback can see besides args/state/control: the model (with its
/// current adapters) and tokenizer, and the event's payload.
pub struct CallbackContext<'a> {
    pub model: &'a dyn CausalLM,
    pub processing_class: &'a PreTrainedTokenizer,
    /// `on_log`: the entry just logged.
    pub logs: Option<&'a Map<String, Value>>,
    /// `on_evaluate`: the evaluation metrics.
    pub metrics: Option<&'a Map<String, Value>>,
    /// `on_save`: the checkpoint just written.
    pub checkpoint_dir: Option<&'a Path>,
    /// Text a callback wants sent to the experiment trackers: `(tag, text)`.
    pub text_logs: Vec<(String, String)>,
}

macro_rules! events {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// A training-loop observer with every event of transformers' `TrainerCallback`.
        /// All methods default to doing nothing; implement the ones you need.
        pub trait TrainerCallback {
            /// Shown in logs and used to find a callback.
            fn name(&self) -> &str {
                std::any::type_name::<Self>().rsplit("::").next().unwrap_or("callback")
            }
            $(
                $(#[doc = $doc])*
                fn $name(&mut self, _args: &SFTConfig, _state: &TrainerState, _control: &mut TrainerControl, _ctx: &mut CallbackContext) {}
            )*
        }

        /// The events, in the order a name tells what happened (used by tests and logs).
        pub const EVENT_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

events! {
    /// End of `SFTTrainer::new`.
    on_init_end,
    /// Start of `train()`.
    on_train_begin,
    /// End of `train()`.
    on_train_end,
    on_epoch_begin,
    on_epoch_end,
    /// Start of an optimizer step (before its first micro-batch).
    on_step_begin,
    /// End of a micro-batch that is not the last of its accumulation window.
    on_substep_end,
    /// After gradient clipping, before the optimizer update.
    on_pre_optimizer_step,
    /// After the optimizer update, before the scheduler advances.
    on_optimizer_step,
    /// End of an optimizer step.
    on_step_end,
    /// After an evaluation (`ctx.metrics`).
    on_evaluate,
    /// After each evaluation batch.
    on_prediction_step,
    /// After a prediction run.
    on_predict,
    /// After a checkpoint is written (`ctx.checkpoint_dir`).
    on_save,
    /// After a log entry (`ctx.logs`).
    on_log,
}

/// Decides when to log, evaluate, save and stop (transformers' `DefaultFlowCallback`).
#[derive(Default)]
pub struct DefaultFlowCallback;

impl TrainerCallback for DefaultFlowCallback {
    fn on_step_end(
        &mut self,
        args: &SFTConfig,
        state: &TrainerState,
        control: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        let step = state.global_step;
        if step == 1 && args.logging_first_step {
            control.should_log = true;
        }
        if args.logging_strategy == IntervalStrategy::Steps
            && state.logging_steps > 0
            && step % state.logging_steps == 0
        {
            control.should_log = true;
        }
        if args.eval_strategy == IntervalStrategy::Steps
            && state.eval_steps > 0
            && step % state.eval_steps == 0
            && args.eval_delay <= step as f64
        {
            control.should_evaluate = true;
        }
        if args.save_strategy == SaveStrategy::Steps
            && state.save_steps > 0
            && step % state.save_steps == 0
        {
            control.should_save = true;
        }
        if step >= state.max_steps {
            control.should_training_stop = true;
            // transformers 5 also evaluates at the very end when that step was not
            // an evaluation step already, and saves at the end with a steps strategy.
            if args.eval_strategy == IntervalStrategy::Steps
                && state.eval_steps > 0
                && step % state.eval_steps != 0
                && args.eval_delay <= step as f64
            {
                control.should_evaluate = true;
            }
            if args.save_strategy == SaveStrategy::Steps {
                control.should_save = true;
            }
        }
    }

    fn on_epoch_end(
        &mut self,
        args: &SFTConfig,
        state: &TrainerState,
        control: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        if args.logging_strategy == IntervalStrategy::Epoch {
            control.should_log = true;
        }
        if args.eval_strategy == IntervalStrategy::Epoch
            && args.eval_delay <= state.epoch.unwrap_or(0.0)
        {
            control.should_evaluate = true;
        }
        if args.save_strategy == SaveStrategy::Epoch {
            control.should_save = true;
        }
    }
}

/// An indicatif progress bar over the optimizer steps, with loss, learning rate,
/// tokens/s and ETA; log entries are printed above it (transformers' `ProgressCallback`).
pub struct ProgressCallback {
    bar: Option<ProgressBar>,
    started: Option<std::time::Instant>,
    tokens_at_start: i64,
}

impl Default for ProgressCallback {
    fn default() -> Self {
        Self {
            bar: None,
            started: None,
            tokens_at_start: 0,
        }
    }
}

impl TrainerCallback for ProgressCallback {
    fn on_train_begin(
        &mut self,
        _args: &SFTConfig,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        // One bar per run, not per rank.
        if !state.is_world_process_zero {
            return;
        }
        let bar = ProgressBar::new(state.max_steps as u64).with_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(state.global_step as u64);
        self.bar = Some(bar);
        self.started = Some(std::time::Instant::now());
        self.tokens_at_start = state.num_input_tokens_seen;
    }

    fn on_step_end(
        &mut self,
        _args: &SFTConfig,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        if let (Some(bar), Some(t0)) = (&self.bar, self.started) {
            bar.set_position(state.global_step as u64);
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            let tps = (state.num_input_tokens_seen - self.tokens_at_start) as f64 / secs;
            let loss = state
                .log_history
                .iter()
                .rev()
                .find_map(|e| e.get("loss").and_then(Value::as_f64))
                .map(|l| format!("loss {l:.4} "))
                .unwrap_or_default();
            bar.set_message(format!("{loss}{tps:.0} tok/s"));
        }
    }

    fn on_log(
        &mut self,
        _args: &SFTConfig,
        state: &TrainerState,
        _c: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        if let (Some(bar), Some(logs)) = (&self.bar, ctx.logs) {
            if state.is_world_process_zero {
                bar.println(format_logs(logs));
            }
        }
    }

    fn on_train_end(
        &mut self,
        _args: &SFTConfig,
        _s: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

/// Prints each log entry (used instead of the progress bar with `disable_tqdm`).
#[derive(Default)]
pub struct PrinterCallback;

impl TrainerCallback for PrinterCallback {
    fn on_log(
        &mut self,
        _args: &SFTConfig,
        state: &TrainerState,
        _c: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        if let (Some(logs), true) = (ctx.logs, state.is_world_process_zero) {
            eprintln!("{}", format_logs(logs));
        }
    }
}

/// `{'loss': 1.2345, 'grad_norm': 0.5, ...}` as transformers prints them.
pub fn format_logs(logs: &Map<String, Value>) -> String {
    let items: Vec<String> = logs
        .iter()
        .map(|(k, v)| match v {
            Value::Number(n) if n.is_f64() => {
                format!("'{k}': {}", short_float(n.as_f64().unwrap_or(f64::NAN)))
            }
            other => format!("'{k}': {other}"),
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

fn short_float(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e6) {
        format!("{x:e}")
    } else {
        let s = format!("{x:.6}");
        let s = s.trim_end_matches('0');
        if s.ends_with('.') {
            format!("{s}0")
        } else {
            s.to_string()
        }
    }
}

/// Stops training when `metric_for_best_model` has not improved by more than
/// `threshold` for `patience` evaluations (transformers' `EarlyStoppingCallback`).
pub struct EarlyStoppingCallback {
    pub patience: usize,
    pub threshold: f64,
    bad_evaluations: usize,
    best: Option<f64>,
}

impl EarlyStoppingCallback {
    pub fn new(patience: usize, threshold: f64) -> Self {
        Self {
            patience,
            threshold,
            bad_evaluations: 0,
            best: None,
        }
    }
}

impl TrainerCallback for EarlyStoppingCallback {
    fn on_evaluate(
        &mut self,
        args: &SFTConfig,
        _state: &TrainerState,
        control: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        let metric = args
            .resolved_metric_for_best_model()
            .unwrap_or_else(|| "loss".into());
        let key = if metric.starts_with("eval_") {
            metric.clone()
        } else {
            format!("eval_{metric}")
        };
        let Some(value) = ctx
            .metrics
            .and_then(|m| m.get(&key))
            .and_then(Value::as_f64)
        else {
            eprintln!(
                "warning: early stopping needs metric {key}, which the evaluation did not report"
            );
            return;
        };
        let greater = args.resolved_greater_is_better().unwrap_or(false);
        let improved = match self.best {
            None => true,
            Some(best) if greater => value > best + self.threshold,
            Some(best) => value < best - self.threshold,
        };
        if improved {
            self.best = Some(value);
            self.bad_evaluations = 0;
        } else {
            self.bad_evaluations += 1;
            if self.bad_evaluations >= self.patience {
                control.should_training_stop = true;
            }
        }
    }
}

/// Training events, mapped onto [`TrainerCallback`] methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
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

/// What an event carries to the callbacks (into [`CallbackContext`]).
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    None,
    Logs(&'a Map<String, Value>),
    Metrics(&'a Map<String, Value>),
    Checkpoint(&'a Path),
}

/// A trainer's callbacks, called in order for each event (transformers' `CallbackHandler`).
#[derive(Default)]
pub struct CallbackHandler {
    callbacks: Vec<Box<dyn TrainerCallback>>,
}

impl CallbackHandler {
    pub fn new(callbacks: Vec<Box<dyn TrainerCallback>>) -> Self {
        Self { callbacks }
    }

    /// Adds a callback after the existing ones (transformers' `add_callback`).
    pub fn add(&mut self, callback: Box<dyn TrainerCallback>) {
        self.callbacks.push(callback);
    }

    /// The callbacks' names, in calling order.
    pub fn names(&self) -> Vec<&str> {
        self.callbacks.iter().map(|c| c.name()).collect()
    }

    /// transformers' `call_event`: resets the per-step flags the event owns,
    /// then calls every callback's method for `event` with `payload` in `ctx`.
    pub fn call_event<'a>(
        &mut self,
        event: Event,
        payload: Payload<'a>,
        args: &SFTConfig,
        state: &TrainerState,
        control: &mut TrainerControl,
        ctx: &mut CallbackContext<'a>,
    ) {
        match payload {
            Payload::None => {}
            Payload::Logs(l) => ctx.logs = Some(l),
            Payload::Metrics(m) => ctx.metrics = Some(m),
            Payload::Checkpoint(p) => ctx.checkpoint_dir = Some(p),
        }
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
            let method = match event {
                Event::InitEnd => TrainerCallback::on_init_end,
                Event::TrainBegin => TrainerCallback::on_train_begin,
                Event::TrainEnd => TrainerCallback::on_train_end,
                Event::EpochBegin => TrainerCallback::on_epoch_begin,
                Event::EpochEnd => TrainerCallback::on_epoch_end,
                Event::StepBegin => TrainerCallback::on_step_begin,
                Event::SubstepEnd => TrainerCallback::on_substep_end,
                Event::PreOptimizerStep => TrainerCallback::on_pre_optimizer_step,
                Event::OptimizerStep => TrainerCallback::on_optimizer_step,
                Event::StepEnd => TrainerCallback::on_step_end,
                Event::Evaluate => TrainerCallback::on_evaluate,
                Event::PredictionStep => TrainerCallback::on_prediction_step,
                Event::Save => TrainerCallback::on_save,
                Event::Log => TrainerCallback::on_log,
            };
            method(cb.as_mut(), args, state, control, ctx);
        }
    }
}
