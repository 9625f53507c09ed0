//! `TrainerCallback`: hooks into the training loop with transformers' events,
//! arguments and order, plus the built-in callbacks (`DefaultFlowCallback`,
//! `ProgressCallback`, `PrinterCallback`, `EarlyStoppingCallback`).

use super::state::{TrainerControl, TrainerState};
use crate::config::{IntervalStrategy, SaveStrategy, TrainingArguments};
use crate::modeling::CausalLM;
use crate::tokenizer::PreTrainedTokenizer;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use std::io::IsTerminal;
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
                fn $name(&mut self, _args: &TrainingArguments, _state: &TrainerState, _control: &mut TrainerControl, _ctx: &mut CallbackContext) {}
            )*
        }

        /// The events, in the order a name tells what happened (used by tests and logs).
        pub const EVENT_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

events! {
    /// End of the trainer's construction (`Trainer::new`, called by `SFTTrainerBuilder::build`).
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
        args: &TrainingArguments,
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
            && step.is_multiple_of(state.logging_steps)
        {
            control.should_log = true;
        }
        if args.eval_strategy == IntervalStrategy::Steps
            && state.eval_steps > 0
            && step.is_multiple_of(state.eval_steps)
            && args.eval_delay <= step as f64
        {
            control.should_evaluate = true;
        }
        if args.save_strategy == SaveStrategy::Steps
            && state.save_steps > 0
            && step.is_multiple_of(state.save_steps)
        {
            control.should_save = true;
        }
        if step >= state.max_steps {
            control.should_training_stop = true;
            // transformers 5 also evaluates at the very end when that step was not
            // an evaluation step already, and saves at the end with a steps strategy.
            if args.eval_strategy == IntervalStrategy::Steps
                && state.eval_steps > 0
                && !step.is_multiple_of(state.eval_steps)
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
        args: &TrainingArguments,
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

/// Progress over the optimizer steps, with loss, tokens/s and ETA, and every
/// log entry (transformers' `ProgressCallback`). On a terminal: an indicatif
/// bar with the entries printed above it. Off a terminal (a file, a pipe, CI,
/// `nohup`), where a bar would be invisible, every entry is printed as a line
/// and a plain progress line every [`PLAIN_PROGRESS_PERCENT`] % of the steps or
/// [`PLAIN_PROGRESS_INTERVAL`], whichever comes first.
#[derive(Default)]
pub struct ProgressCallback {
    bar: Option<ProgressBar>,
    /// Off a terminal: when the last plain progress line was printed, and at which step.
    plain: Option<PlainProgress>,
    started: Option<std::time::Instant>,
    tokens_at_start: i64,
    step_at_start: usize,
}

/// Plain progress lines at least every this many percent of the steps…
pub const PLAIN_PROGRESS_PERCENT: usize = 5;
/// …and at least this often.
pub const PLAIN_PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(180);

struct PlainProgress {
    last_time: std::time::Instant,
    last_step: usize,
}

impl ProgressCallback {
    fn tokens_per_second(&self, state: &TrainerState) -> f64 {
        let secs = self
            .started
            .map_or(0.0, |t0| t0.elapsed().as_secs_f64())
            .max(1e-9);
        (state.num_input_tokens_seen - self.tokens_at_start) as f64 / secs
    }
}

/// The loss of the newest log entry that has one.
fn last_loss(state: &TrainerState) -> Option<f64> {
    state
        .log_history
        .iter()
        .rev()
        .find_map(|e| e.get("loss").and_then(Value::as_f64))
}

impl TrainerCallback for ProgressCallback {
    fn on_train_begin(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        // One bar per run, not per rank.
        if !state.is_world_process_zero {
            return;
        }
        let now = std::time::Instant::now();
        self.started = Some(now);
        self.tokens_at_start = state.num_input_tokens_seen;
        self.step_at_start = state.global_step;
        // indicatif draws nothing off a terminal, println above the bar included.
        if !std::io::stderr().is_terminal() {
            self.plain = Some(PlainProgress {
                last_time: now,
                last_step: state.global_step,
            });
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
    }

    fn on_step_end(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        let tps = self.tokens_per_second(state);
        if let Some(bar) = &self.bar {
            bar.set_position(state.global_step as u64);
            let loss = last_loss(state)
                .map(|l| format!("loss {} ", format_float(l)))
                .unwrap_or_default();
            bar.set_message(format!("{loss}{tps:.0} tok/s"));
        }
        let Some(plain) = &mut self.plain else {
            return;
        };
        let step = state.global_step;
        let max = state.max_steps.max(1);
        let every = (max * PLAIN_PROGRESS_PERCENT).div_ceil(100).max(1);
        let due = step / every > plain.last_step / every
            || plain.last_time.elapsed() >= PLAIN_PROGRESS_INTERVAL
            || step >= max;
        if !due || step == plain.last_step {
            return;
        }
        plain.last_time = std::time::Instant::now();
        plain.last_step = step;
        let elapsed = self.started.map_or(0.0, |t0| t0.elapsed().as_secs_f64());
        eprintln!(
            "{}",
            progress_line(
                step,
                max,
                last_loss(state),
                tps,
                elapsed,
                step - self.step_at_start
            )
        );
    }

    fn on_log(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        let (Some(logs), true) = (ctx.logs, state.is_world_process_zero) else {
            return;
        };
        if let Some(bar) = &self.bar {
            bar.println(format_logs(logs));
        } else if self.plain.is_some() {
            eprintln!("{}", format_logs(logs));
        }
    }

    fn on_train_end(
        &mut self,
        _args: &TrainingArguments,
        _s: &TrainerState,
        _c: &mut TrainerControl,
        _ctx: &mut CallbackContext,
    ) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        self.plain = None;
    }
}

/// `step 120/660 (18%) loss 1.234, 3,210 tok/s, elapsed 2:05, ETA 9:22`: the
/// progress line printed off a terminal. The ETA extrapolates the steps done
/// in this process (not those of a resumed checkpoint).
pub fn progress_line(
    step: usize,
    max_steps: usize,
    loss: Option<f64>,
    tokens_per_second: f64,
    elapsed_secs: f64,
    steps_this_run: usize,
) -> String {
    let max = max_steps.max(1);
    let percent = 100 * step.min(max) / max;
    let loss = loss
        .map(|l| format!(" loss {},", format_float(l)))
        .unwrap_or_default();
    let eta = if steps_this_run > 0 {
        let per_step = elapsed_secs / steps_this_run as f64;
        format!(
            ", ETA {}",
            clock(per_step * max.saturating_sub(step) as f64)
        )
    } else {
        String::new()
    };
    format!(
        "step {step}/{max} ({percent}%){loss} {} tok/s, elapsed {}{eta}",
        thousands(tokens_per_second.round() as u64),
        clock(elapsed_secs)
    )
}

/// `12:31`, `1:02:03`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// `3,210`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints each log entry (used instead of the progress bar with `disable_tqdm`).
#[derive(Default)]
pub struct PrinterCallback;

impl TrainerCallback for PrinterCallback {
    fn on_log(
        &mut self,
        _args: &TrainingArguments,
        state: &TrainerState,
        _c: &mut TrainerControl,
        ctx: &mut CallbackContext,
    ) {
        if let (Some(logs), true) = (ctx.logs, state.is_world_process_zero) {
            eprintln!("{}", format_logs(logs));
        }
    }
}

/// `{'loss': 1.234, 'grad_norm': 0.5, 'learning_rate': 9.199e-05, ...}` as
/// transformers 5 prints log entries: every float with Python's `{:.4g}`,
/// `total_flos` left out (it stays in `trainer_state.json`). Whole-valued
/// floats print as integers, so token counts (floats in the log dicts, as in
/// transformers' `num_tokens`) keep every digit.
pub fn format_logs(logs: &Map<String, Value>) -> String {
    let items: Vec<String> = logs
        .iter()
        .filter(|(k, _)| k.as_str() != "total_flos")
        .map(|(k, v)| match v {
            Value::Number(n) if n.is_f64() => {
                format!("'{k}': {}", format_float(n.as_f64().unwrap_or(f64::NAN)))
            }
            other => format!("'{k}': {other}"),
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Python's `f"{x:.4g}"` (4 significant digits, scientific below 1e-4 and from
/// 1e4, trailing zeros dropped), except that whole numbers below 2^53 print
/// as integers.
pub fn format_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0 {
        return format!("{}", x as i64);
    }
    const PRECISION: i32 = 4;
    // The exponent after rounding to 4 significant digits (9.9996 -> 1.000e1).
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, x);
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..PRECISION).contains(&exp) {
        let decimals = (PRECISION - 1 - exp).max(0) as usize;
        trim_zeros(&format!("{x:.decimals$}")).to_string()
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim_zeros(mantissa), exp.abs())
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
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
        args: &TrainingArguments,
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
            log::warn!("early stopping needs metric {key}, which the evaluation did not report");
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
        args: &TrainingArguments,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_print_like_python_4g() {
        // Expected strings are Python's f"{x:.4g}".
        for (x, py) in [
            (0.003992, "0.003992"),
            (9.198670696444339e-4, "0.0009199"),
            (9.198670696444339e-5, "9.199e-05"),
            (7.244343, "7.244"),
            (0.0, "0"),
            (12345.678, "1.235e+04"),
            (416.007, "416"),
            (2.5e-7, "2.5e-07"),
            (1e-4, "0.0001"),
            (123456789.5, "1.235e+08"),
            (9.9996, "10"),
            (-0.5, "-0.5"),
            (0.909091, "0.9091"),
        ] {
            assert_eq!(format_float(x), py, "{x:?}");
        }
        // Token counts are floats in the log dicts: all their digits stay.
        assert_eq!(format_float(140100.0), "140100");
    }

    #[test]
    fn log_lines_use_one_style_and_leave_out_total_flos() {
        let logs = json!({"loss": 7.244343, "learning_rate": 9.198670696444339e-5,
            "grad_norm": 1.425466, "num_tokens": 2306.0, "total_flos": 1.5e12, "step": 3});
        assert_eq!(
            format_logs(logs.as_object().unwrap()),
            "{'loss': 7.244, 'learning_rate': 9.199e-05, 'grad_norm': 1.425, 'num_tokens': 2306, 'step': 3}"
        );
    }

    #[test]
    fn progress_line_reads_well() {
        assert_eq!(
            progress_line(120, 660, Some(1.23456), 3210.4, 120.0, 120),
            "step 120/660 (18%) loss 1.235, 3,210 tok/s, elapsed 2:00, ETA 9:00"
        );
        // Nothing to extrapolate from yet, and hours.
        assert_eq!(
            progress_line(0, 10, None, 0.0, 3725.0, 0),
            "step 0/10 (0%) 0 tok/s, elapsed 1:02:05"
        );
    }
}
