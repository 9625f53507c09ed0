//! One optimizer step: accumulate a window of micro-batches, combine the
//! ranks, clip, update (or skip a non-finite update), advance the counters.

use super::flos::floating_point_ops;
use super::{fault, Event, Optimization, Payload, Trainer, TrainerError, TrainingHooks};
use crate::modeling::PreTrainedModel;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use tch::Tensor;

/// Sums of a logging window (TRL's `_metrics`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct WindowMetrics {
    /// Sum of per-step mean losses since the last log.
    pub loss_sum: f64,
    /// Per-micro-batch values of each hook metric, averaged at log time
    /// (`name: [values]`, in logging order).
    #[serde(flatten)]
    pub values: Map<String, Value>,
}

impl WindowMetrics {
    fn push(&mut self, name: &str, value: f64) {
        if let Value::Array(v) = self.values.entry(name).or_insert_with(|| json!([])) {
            v.push(json!(value));
        }
    }

    /// `(name, mean over the window)` of each metric, in logging order.
    pub fn means(&self) -> Vec<(String, f64)> {
        self.values
            .iter()
            .map(|(name, v)| {
                let xs: Vec<f64> = v
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default();
                (
                    name.clone(),
                    xs.iter().sum::<f64>() / xs.len().max(1) as f64,
                )
            })
            .collect()
    }

    /// Checkpoints written before the metrics were named as logged called
    /// the token accuracy `accuracy`.
    pub fn upgrade_legacy_names(&mut self) {
        if let Some(v) = self.values.remove("accuracy") {
            self.values.insert("mean_token_accuracy".into(), v);
        }
    }
}

/// Loop counters that are not part of `trainer_state.json` but make a resumed
/// run continue exactly (saved as `trainer_extra.json` in checkpoints).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct LoopState {
    pub window: WindowMetrics,
    pub total_loss: f64,
    pub last_logged_step: usize,
    pub last_grad_norm: Option<f64>,
    /// Learning rate of the last optimizer step (what transformers logs).
    #[serde(default)]
    pub current_lr: f64,
    /// Optimizer steps skipped in a row because the loss or gradient was not finite.
    #[serde(default)]
    pub nonfinite_in_a_row: usize,
}

/// Where a window of micro-batches sits in its epoch (for the fractional epoch).
pub(super) struct WindowPosition {
    pub epoch: usize,
    pub window_idx: usize,
    pub batches_in_epoch: usize,
}

/// What one optimizer step's micro-batches produced on this rank (then, after
/// [`Trainer::reduce_step`], on all ranks).
pub(super) struct StepTotals {
    pub loss: f64,
    pub tokens: i64,
    /// transformers' `floating_point_ops` of the micro-batches.
    pub flos: f64,
    /// Each micro-batch's metrics, in order.
    pub metrics: Vec<Vec<(&'static str, f64)>>,
    pub interrupted: bool,
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// One optimizer step over a window of micro-batches. Returns whether an
    /// interrupt was requested (on any rank: all ranks stop at the same step).
    pub(super) fn training_step(
        &mut self,
        window: &[Vec<usize>],
        position: WindowPosition,
        run: &mut Optimization,
    ) -> Result<bool, TrainerError> {
        self.fire(Event::StepBegin, Payload::None);
        // Dropout masks depend only on (seed, step): a resumed run draws the same ones.
        tch::manual_seed(self.args.seed as i64 + 1_000_003 * self.state.global_step as i64);
        let mut totals = self.accumulate(window)?;
        if fault::nan_at_step(self.state.global_step + 1) {
            totals.loss = f64::NAN;
        }
        totals.interrupted = self.interrupt.load(Ordering::SeqCst);
        let tensors: Vec<Tensor> = self.params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let grad_norm = self.reduce_and_clip(&tensors, &mut totals, &mut run.optimizer)?;
        for batch_metrics in &totals.metrics {
            for (name, value) in batch_metrics {
                self.loop_state.window.push(name, *value);
            }
        }
        self.state.num_input_tokens_seen += totals.tokens;
        self.state.total_flos += totals.flos;
        self.fire(Event::PreOptimizerStep, Payload::None);
        let lr = run.scheduler.lr_at(self.state.global_step);
        let finite = totals.loss.is_finite() && grad_norm.is_finite();
        if finite {
            self.loop_state.nonfinite_in_a_row = 0;
            self.optimizer_step(&mut run.optimizer, lr)?;
        } else {
            self.skip_nonfinite_update(totals.loss, grad_norm)?;
        }
        self.fire(Event::OptimizerStep, Payload::None);
        run.optimizer.zero_grad();
        self.advance(window.len(), position, totals.loss, finite, grad_norm, lr);
        Ok(totals.interrupted)
    }

    /// Forward and backward over the window's micro-batches, each loss divided
    /// by the window's loss tokens (transformers' `num_items_in_batch`: the
    /// step's loss is the token mean over all its examples however they are
    /// split — across ranks too with `average_tokens_across_devices`).
    fn accumulate(&mut self, window: &[Vec<usize>]) -> Result<StepTotals, TrainerError> {
        let batches: Vec<H::Batch> = window.iter().map(|idx| self.batch_of(idx)).collect();
        let mut num_items: i64 = batches.iter().map(|b| self.hooks.num_loss_tokens(b)).sum();
        if self.args.average_tokens_across_devices {
            num_items = self.sum_across_ranks(num_items)?;
        }
        let mut totals = StepTotals {
            loss: 0.0,
            tokens: 0,
            flos: 0.0,
            metrics: Vec::with_capacity(batches.len()),
            interrupted: false,
        };
        for (i, batch) in batches.iter().enumerate() {
            let out = self
                .hooks
                .compute_loss(&self.model, batch, Some(num_items.max(1)), true)?;
            totals.loss += out.loss;
            totals.tokens += out.num_tokens;
            totals.flos +=
                floating_point_ops(self.non_embedding_params, self.hooks.num_input_slots(batch));
            totals.metrics.push(out.metrics);
            if i + 1 < batches.len() {
                self.fire(Event::SubstepEnd, Payload::None);
            }
        }
        Ok(totals)
    }

    fn batch_of(&self, indices: &[usize]) -> H::Batch {
        let examples: Vec<&H::Example> = indices.iter().map(|&i| &self.train_dataset[i]).collect();
        self.hooks.collate(&examples, self.device)
    }

    /// A NaN/inf update would poison the weights (and every later step): it
    /// is skipped; too many in a row stop the run.
    fn skip_nonfinite_update(&mut self, loss: f64, grad_norm: f64) -> Result<(), TrainerError> {
        let step = self.state.global_step + 1;
        self.loop_state.nonfinite_in_a_row += 1;
        let in_a_row = self.loop_state.nonfinite_in_a_row;
        log::warn!("step {step}: loss {loss} / grad_norm {grad_norm} is not finite; the update is skipped ({in_a_row} in a row)"
        );
        if in_a_row >= self.max_nonfinite_steps {
            return Err(TrainerError::Invalid(format!(
                "{in_a_row} optimizer steps in a row had a NaN/inf loss or gradient (last at step {step}); stopping. \
                 Lower the learning rate, check the data, or resume from the last checkpoint"
            )));
        }
        Ok(())
    }

    /// Step counter, fractional epoch and the logging window after a step.
    fn advance(
        &mut self,
        micro_batches: usize,
        position: WindowPosition,
        loss: f64,
        finite: bool,
        grad_norm: f64,
        lr: f64,
    ) {
        self.state.global_step += 1;
        // transformers: epoch + micro-batches done in this epoch / micro-batches per epoch.
        let ga = self.args.gradient_accumulation_steps.max(1);
        let done = (position.window_idx * ga + micro_batches).min(position.batches_in_epoch);
        self.state.epoch =
            Some(position.epoch as f64 + done as f64 / position.batches_in_epoch as f64);
        // Non-finite losses stay out of the logged averages (transformers' logging_nan_inf_filter).
        let logged = if finite || !self.args.logging_nan_inf_filter {
            loss
        } else {
            self.loop_state.total_loss / self.state.global_step.max(1) as f64
        };
        self.loop_state.window.loss_sum += logged;
        self.loop_state.total_loss += logged;
        self.loop_state.last_grad_norm = Some(grad_norm);
        // transformers logs the rate this step used.
        self.loop_state.current_lr = lr;
    }
}
