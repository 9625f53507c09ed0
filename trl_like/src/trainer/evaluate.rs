//! Logging, evaluation and the log / evaluate / save decision after each
//! step (transformers' `log`, `evaluate` and `_maybe_log_save_evaluate`).

use super::{
    release_free_memory, round, Event, LossOutput, Payload, Trainer, TrainerError, TrainingHooks,
};
use crate::distributed::ReduceOp;
use crate::modeling::PreTrainedModel;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Instant;

/// Sums over the evaluation batches of one rank (then of all ranks).
struct EvalSums {
    /// Each batch's mean loss times its number of examples.
    loss: f64,
    /// Per-metric sums of the batches' values, in logging order.
    metrics: Vec<(&'static str, f64)>,
    batches: usize,
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// Runs the evaluation set and logs `eval_loss` & co. (transformers' `evaluate`).
    pub fn evaluate(&mut self) -> Result<Map<String, Value>, TrainerError> {
        let Some(n) = self.eval_dataset.as_ref().map(Vec::len) else {
            return Err(TrainerError::Invalid(
                "evaluation needs an eval_dataset".into(),
            ));
        };
        let start = Instant::now();
        let mut sums = self.evaluation_loop()?;
        if let Some(group) = &self.process_group {
            let mut v = vec![sums.loss];
            v.extend(sums.metrics.iter().map(|(_, x)| *x));
            v.push(sums.batches as f64);
            group.all_reduce_f64(&mut v, ReduceOp::Sum)?;
            sums.loss = v[0];
            for (i, (_, x)) in sums.metrics.iter_mut().enumerate() {
                *x = v[1 + i];
            }
            sums.batches = v[v.len() - 1] as usize;
        }
        let runtime = start.elapsed().as_secs_f64().max(1e-9);
        let mut metrics = Map::new();
        metrics.insert("eval_loss".into(), json!(sums.loss / n.max(1) as f64));
        metrics.insert("eval_runtime".into(), json!(round(runtime, 4)));
        metrics.insert(
            "eval_samples_per_second".into(),
            json!(round(n as f64 / runtime, 3)),
        );
        metrics.insert(
            "eval_steps_per_second".into(),
            json!(round(sums.batches as f64 / runtime, 3)),
        );
        for (name, sum) in &sums.metrics {
            metrics.insert(
                format!("eval_{name}"),
                json!(sum / sums.batches.max(1) as f64),
            );
        }
        metrics.insert(
            "eval_num_tokens".into(),
            json!(self.state.num_input_tokens_seen as f64),
        );
        self.log(metrics.clone());
        self.fire(Event::Evaluate, Payload::Metrics(&metrics));
        self.control.should_evaluate = false;
        Ok(metrics)
    }

    /// This rank's share of the evaluation batches: batch i is evaluated by
    /// rank i % world_size.
    fn evaluation_loop(&mut self) -> Result<EvalSums, TrainerError> {
        let n = self.eval_dataset.as_ref().map_or(0, Vec::len);
        let bs = self.args.per_device_eval_batch_size.max(1);
        let (rank, world_size) = self.rank_and_world_size();
        let mut sums = EvalSums {
            loss: 0.0,
            metrics: self
                .hooks
                .metric_names()
                .into_iter()
                .map(|k| (k, 0.0))
                .collect(),
            batches: 0,
        };
        let starts = (0..n).step_by(bs).enumerate();
        for (_, first) in starts.filter(|(i, _)| i % world_size == rank) {
            let (out, rows) = self.eval_batch(first, bs)?;
            // transformers repeats each batch's mean loss batch-size times, then averages.
            sums.loss += out.loss * rows as f64;
            for ((_, sum), (_, x)) in sums.metrics.iter_mut().zip(&out.metrics) {
                *sum += x;
            }
            sums.batches += 1;
            self.fire(Event::PredictionStep, Payload::None);
        }
        Ok(sums)
    }

    /// The loss of the evaluation rows `first..first + bs`, and how many there are.
    fn eval_batch(&self, first: usize, bs: usize) -> Result<(LossOutput, usize), TrainerError> {
        let eval = self.eval_dataset.as_deref().unwrap_or_default();
        let rows: Vec<&H::Example> = eval[first..(first + bs).min(eval.len())].iter().collect();
        let batch = self.hooks.collate(&rows, self.device);
        let out = self.hooks.compute_loss(&self.model, &batch, None, false)?;
        Ok((out, rows.len()))
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
                log::warn!("could not write a tracker log: {e}");
            }
        }
        self.fire(Event::Log, Payload::Logs(&logs));
        self.control.should_log = false;
    }

    /// The training log entry of the window since the last one: mean loss,
    /// last grad norm, learning rate, the hooks' metrics, tokens seen.
    fn log_training_window(&mut self) {
        let steps = (self.state.global_step - self.loop_state.last_logged_step) as f64;
        let w = std::mem::take(&mut self.loop_state.window);
        let mut logs = Map::new();
        logs.insert("loss".into(), json!(w.loss_sum / steps));
        if let Some(g) = self.loop_state.last_grad_norm {
            logs.insert("grad_norm".into(), json!(g));
        }
        logs.insert("learning_rate".into(), json!(self.loop_state.current_lr));
        for (name, mean) in w.means() {
            logs.insert(name, json!(mean));
        }
        logs.insert(
            "num_tokens".into(),
            json!(self.state.num_input_tokens_seen as f64),
        );
        self.loop_state.last_logged_step = self.state.global_step;
        self.log(logs);
    }

    /// Logs, evaluates and saves as the callbacks decided.
    pub(super) fn maybe_log_save_evaluate(
        &mut self,
        output_dir: &Path,
        optimizer: &crate::optim::TrainOptimizer,
    ) -> Result<(), TrainerError> {
        if self.control.should_log && self.state.global_step > self.loop_state.last_logged_step {
            self.log_training_window();
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
            self.save_checkpoint(output_dir, optimizer, metrics.as_ref())?;
        }
        if evaluated_or_saved {
            release_free_memory();
        }
        Ok(())
    }
}
