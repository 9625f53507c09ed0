//! What the loop does across data-parallel ranks (transformers' DDP rules):
//! the same start weights, summed gradients and metrics once per step, one
//! writer, and a final check that the ranks stayed in step. In a single
//! process every function here returns at once.

use super::step::StepTotals;
use super::{Trainer, TrainerError, TrainingHooks};
use crate::distributed::ReduceOp;
use crate::modeling::PreTrainedModel;
use tch::{Kind, Tensor};

/// Largest number of trainable values whose cross-rank equality is checked at
/// the end of a data-parallel run (LoRA adapters are far below it).
pub const SYNC_CHECK_MAX_VALUES: i64 = 200_000_000;

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
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

    /// Waits for every rank.
    pub(super) fn barrier(&self) -> Result<(), TrainerError> {
        if let Some(g) = &self.process_group {
            g.barrier()?;
        }
        Ok(())
    }

    /// DDP's start: every rank begins from rank 0's trainable weights.
    pub(super) fn broadcast_parameters(&self) -> Result<(), TrainerError> {
        if let Some(group) = &self.process_group {
            let tensors: Vec<Tensor> = self.params.iter().map(|(_, t)| t.shallow_clone()).collect();
            group.broadcast_parameters(&tensors)?;
        }
        Ok(())
    }

    /// `n` summed over the ranks.
    pub(super) fn sum_across_ranks(&self, n: i64) -> Result<i64, TrainerError> {
        let Some(group) = &self.process_group else {
            return Ok(n);
        };
        let mut v = [n as f64];
        group.all_reduce_f64(&mut v, ReduceOp::Sum)?;
        Ok(v[0] as i64)
    }

    /// What the summed gradients (and loss) of the ranks are multiplied by.
    pub(super) fn gradient_scale(&self) -> f64 {
        let world = self.rank_and_world_size().1 as f64;
        // Each rank's loss is its token sum over the global count, so summing
        // the gradients gives the single-process gradient of the union batch.
        // Without average_tokens_across_devices each rank normalised by its
        // own tokens and the ranks are averaged, as DDP does.
        if self.args.average_tokens_across_devices {
            1.0
        } else {
            1.0 / world
        }
    }

    /// Sums the step's gradients over the ranks, and in one more collective
    /// its loss, tokens, metrics and stop flag.
    pub(super) fn reduce_step(
        &self,
        tensors: &[Tensor],
        totals: &mut StepTotals,
    ) -> Result<(), TrainerError> {
        let Some(group) = &self.process_group else {
            return Ok(());
        };
        let world = group.world_size() as f64;
        let scale = self.gradient_scale();
        group.all_reduce_gradients(tensors, scale)?;
        // [loss, tokens, interrupt, flos, every micro-batch's metrics..]
        let mut v = vec![
            totals.loss,
            totals.tokens as f64,
            totals.interrupted as u8 as f64,
            totals.flos,
        ];
        v.extend(totals.metrics.iter().flatten().map(|(_, x)| *x));
        group.all_reduce_f64(&mut v, ReduceOp::Sum)?;
        totals.loss = v[0] * scale;
        totals.tokens = v[1] as i64;
        totals.interrupted = v[2] > 0.0;
        totals.flos = v[3];
        for ((_, x), sum) in totals.metrics.iter_mut().flatten().zip(&v[4..]) {
            *x = sum / world;
        }
        Ok(())
    }

    /// Data-parallel check at the end of training: every rank must hold
    /// bit-identical trainable weights (one MIN and one MAX all-reduce of them;
    /// skipped above [`SYNC_CHECK_MAX_VALUES`], i.e. for large full fine-tunes).
    pub(super) fn check_ranks_in_sync(&self) -> Result<(), TrainerError> {
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
            log::info!(
                "data parallel: all {} ranks hold bit-identical trainable weights ({total} values)",
                group.world_size()
            );
        }
        Ok(())
    }
}
