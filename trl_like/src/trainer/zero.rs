//! `--deepspeed`: the trainer's side of ZeRO (see [`crate::optim::ZeroOptimizer`]):
//! building it from the config, the per-step reduction/clipping/update, and
//! its sharded checkpoint files.

use super::step::StepTotals;
use super::{io_err, Trainer, TrainerError, TrainingHooks};
use crate::config::DeepSpeedConfig;
use crate::modeling::PreTrainedModel;
use crate::optim::{clip_grad_norm, TrainOptimizer, ZeroOptimizer};
use std::path::{Path, PathBuf};
use tch::Tensor;

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// The ZeRO optimizer `--deepspeed` asks for (None without it), after
    /// checking the config against the flags; rank 0 prints its memory.
    pub(super) fn zero_optimizer(&self) -> Result<Option<ZeroOptimizer>, TrainerError> {
        let Some(path) = self.args.deepspeed.as_deref() else {
            return Ok(None);
        };
        let world = self.rank_and_world_size().1;
        let config = DeepSpeedConfig::from_file(Path::new(path))?;
        let plan = config.resolve(&self.args, world)?;
        let zero = ZeroOptimizer::new(
            self.params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            self.args.weight_decay,
            (
                (self.args.adam_beta1, self.args.adam_beta2),
                self.args.adam_epsilon,
            ),
            plan.stage,
            self.process_group.as_ref(),
        )?;
        if self.is_world_process_zero() {
            let (state, grads) = zero.state_bytes();
            let psi = zero.numel();
            log::info!(
                "deepspeed: ZeRO stage {} over {world} rank(s), bf16 {}: {psi} trainable values; per rank: \
                 optimizer state {state} bytes (fp32 master + exp_avg + exp_avg_sq), fp32 gradient {grads} bytes \
                 (plain AdamW: {} bytes of moments, no master)",
                plan.stage,
                plan.bf16,
                8 * psi
            );
        }
        Ok(Some(zero))
    }

    /// Combines the ranks' gradients and step totals (see `reduce_step`) and
    /// clips on the global norm, which it returns.
    pub(super) fn reduce_and_clip(
        &self,
        tensors: &[Tensor],
        totals: &mut StepTotals,
        optimizer: &mut TrainOptimizer,
    ) -> Result<f64, TrainerError> {
        match optimizer {
            TrainOptimizer::Plain(_) => {
                self.reduce_step(tensors, totals)?;
                Ok(clip_grad_norm(tensors, self.args.max_grad_norm))
            }
            TrainOptimizer::Zero(zero) => {
                // The metrics travel as before; the gradients go to the shards.
                self.reduce_step(&[], totals)?;
                let group = self.process_group.as_ref();
                zero.reduce_gradients(group, self.gradient_scale())?;
                Ok(zero.clip_grad_norm(group, self.args.max_grad_norm)?)
            }
        }
    }

    /// The AdamW update (for ZeRO: of this rank's shard, then the all-gather).
    pub(super) fn optimizer_step(
        &self,
        optimizer: &mut TrainOptimizer,
        lr: f64,
    ) -> Result<(), TrainerError> {
        match optimizer {
            TrainOptimizer::Plain(o) => o.step(lr),
            TrainOptimizer::Zero(z) => z.step(lr, self.process_group.as_ref())?,
        }
        Ok(())
    }

    /// Where ranks put their optimizer shards until rank 0 moves them into checkpoint `name`.
    fn zero_staging_dir(output_dir: &Path, name: &str) -> PathBuf {
        output_dir.join(format!(".{name}.zero"))
    }

    /// Every rank that holds a shard writes it to the staging folder (then all wait).
    pub(super) fn stage_zero_shards(
        &self,
        output_dir: &Path,
        name: &str,
        optimizer: &TrainOptimizer,
    ) -> Result<(), TrainerError> {
        if let TrainOptimizer::Zero(z) = optimizer {
            let rank = self.rank_and_world_size().0;
            if z.writes_shard(rank) {
                z.save_shard(&Self::zero_staging_dir(output_dir, name))?;
            }
            self.barrier()?;
        }
        Ok(())
    }

    /// Rank 0 moves the staged shards into the checkpoint being written.
    pub(super) fn move_zero_shards(
        output_dir: &Path,
        name: &str,
        zero: &ZeroOptimizer,
        into: &Path,
    ) -> Result<(), TrainerError> {
        let staged = Self::zero_staging_dir(output_dir, name);
        for file in zero.checkpoint_file_names() {
            let (from, to) = (staged.join(&file), into.join(&file));
            std::fs::rename(&from, &to).map_err(io_err(&from))?;
        }
        std::fs::remove_dir_all(&staged).map_err(io_err(&staged))
    }
}
