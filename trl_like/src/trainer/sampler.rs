//! The order of the training samples and their micro-batches per epoch
//! (transformers' samplers), sharded over data-parallel ranks.

use super::{Trainer, TrainingHooks};
use crate::config::SamplingStrategy;
use crate::distributed::shard_round_robin;
use crate::modeling::PreTrainedModel;

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// Micro-batches of one epoch: indices into the training set.
    pub(super) fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let n = self.train_dataset.len();
        let bs = self.args.per_device_train_batch_size.max(1);
        let seed = self.args.data_seed.unwrap_or(self.args.seed);
        let order: Vec<usize> = match self.args.sampling_strategy() {
            SamplingStrategy::Sequential => (0..n).collect(),
            SamplingStrategy::Random => shuffled(n, seed, epoch),
            // transformers' LengthGroupedSampler: shuffle, cut into mega-batches
            // of 50 batches, sort each by length (longest first).
            SamplingStrategy::GroupByLength => shuffled(n, seed, epoch)
                .chunks(50 * bs)
                .flat_map(|chunk| {
                    let mut c = chunk.to_vec();
                    c.sort_by_key(|&i| {
                        std::cmp::Reverse(self.hooks.example_len(&self.train_dataset[i]))
                    });
                    c
                })
                .collect(),
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
    pub(super) fn num_batches_per_epoch(&self) -> usize {
        let bs = self.args.per_device_train_batch_size.max(1);
        let n = self.train_dataset.len();
        let global = if self.args.dataloader_drop_last {
            n / bs
        } else {
            n.div_ceil(bs)
        };
        global.div_ceil(self.rank_and_world_size().1)
    }
}

/// A seeded shuffle of `0..n` for `epoch` (same order for the same seed and epoch,
/// which is what makes resuming exact).
fn shuffled(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    crate::data::permutation(n, seed.wrapping_add(epoch as u64))
}
