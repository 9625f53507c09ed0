//! What a run prints and reports: the opening banner and the closing speed
//! metrics (transformers' `speed_metrics`).

use super::{round, StepPlan, Trainer, TrainingHooks};
use crate::modeling::PreTrainedModel;
use serde_json::{json, Map, Value};
use std::time::Instant;

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// transformers' "***** Running training *****" banner (rank 0).
    pub(super) fn print_run_header(&self, plan: &StepPlan) {
        if !self.is_world_process_zero() {
            return;
        }
        let ga = self.args.gradient_accumulation_steps.max(1);
        let world_size = self.rank_and_world_size().1;
        if world_size > 1 {
            let backend = self
                .process_group
                .as_ref()
                .map_or("", |g| g.backend().name());
            let bs = self.args.per_device_train_batch_size;
            log::info!(
                "data parallel: {world_size} ranks ({backend} backend), global batch {bs} x {world_size} x {ga} = {}",
                bs * world_size * ga
            );
        }
        let (trainable, total) = self.trainable_parameters();
        log::info!(
            "***** Running training *****\n  examples = {}, epochs = {}, batch size = {}, accumulation = {}, optimizer steps = {}\n  trainable params: {} || all params: {} || trainable%: {:.4}",
            self.train_dataset.len(),
            plan.num_epochs,
            self.args.per_device_train_batch_size,
            ga,
            plan.max_steps,
            trainable,
            total,
            100.0 * trainable as f64 / total.max(1) as f64
        );
    }

    /// transformers' closing speed metrics and `train_loss`.
    pub(super) fn train_metrics(
        &self,
        start: (Instant, usize),
        tokens_at_start: i64,
    ) -> Map<String, Value> {
        let (clock, start_step) = start;
        let runtime = clock.elapsed().as_secs_f64().max(1e-9);
        let ga = self.args.gradient_accumulation_steps.max(1);
        let world_size = self.rank_and_world_size().1;
        let steps = (self.state.global_step - start_step) as f64;
        let samples = steps * (self.args.per_device_train_batch_size * ga * world_size) as f64;
        let tokens = (self.state.num_input_tokens_seen - tokens_at_start) as f64;
        let mut metrics = Map::new();
        metrics.insert("train_runtime".into(), json!(round(runtime, 4)));
        metrics.insert(
            "train_samples_per_second".into(),
            json!(round(samples / runtime, 3)),
        );
        metrics.insert(
            "train_steps_per_second".into(),
            json!(round(steps / runtime, 3)),
        );
        metrics.insert(
            "train_tokens_per_second".into(),
            json!(round(tokens / runtime, 3)),
        );
        metrics.insert("total_flos".into(), json!(self.state.total_flos));
        metrics.insert("train_loss".into(), json!(self.train_loss()));
        self.insert_peak_memory(&mut metrics);
        metrics
    }

    /// On CUDA, the caching allocator's peaks over the process so far
    /// (`torch.cuda.max_memory_allocated` / `max_memory_reserved`, in GB of
    /// 10⁹ bytes): `train_peak_memory_gb` and `train_peak_reserved_memory_gb`.
    /// Absent on CPU, where there is no such allocator.
    fn insert_peak_memory(&self, metrics: &mut Map<String, Value>) {
        if !matches!(self.device, tch::Device::Cuda(_)) {
            return;
        }
        match crate::ops::cuda_memory_stats() {
            Ok(Some(m)) => {
                let gb = |bytes: i64| json!(round(bytes as f64 / 1e9, 3));
                metrics.insert("train_peak_memory_gb".into(), gb(m.peak_allocated));
                metrics.insert("train_peak_reserved_memory_gb".into(), gb(m.peak_reserved));
            }
            Ok(None) => {}
            Err(e) => log::warn!("train_peak_memory_gb not reported: {e}"),
        }
    }

    pub(super) fn train_loss(&self) -> f64 {
        self.loop_state.total_loss / self.state.global_step.max(1) as f64
    }
}
