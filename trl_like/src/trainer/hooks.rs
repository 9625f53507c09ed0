//! What a trainer adds to the shared loop: how rows become batches and what
//! the loss of a batch is (transformers' `data_collator`, `compute_loss` and
//! `prediction_step`, which `SFTTrainer` and the other TRL trainers override).

use super::TrainerError;
use crate::config::TrainingArguments;
use crate::modeling::PreTrainedModel;
use tch::Device;

/// One forward (and, in training, backward) pass over a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The scalar loss: summed token losses / `num_items`, or the batch's own mean.
    pub loss: f64,
    /// Real tokens in the batch (attention-mask ones), for `num_tokens`.
    pub num_tokens: i64,
    /// Per-batch statistics logged beside the loss under these names
    /// (averaged over the micro-batches of a logging window; `eval_` prefixed
    /// in evaluation), in the order they are logged.
    pub metrics: Vec<(&'static str, f64)>,
}

/// The trainer-specific half of [`super::Trainer`].
pub trait TrainingHooks<M: PreTrainedModel> {
    /// The trainer's config: the shared arguments plus its own options
    /// (written to each checkpoint's `training_args.json`).
    type Args: std::ops::Deref<Target = TrainingArguments> + serde::Serialize + Clone;
    /// One prepared row of the training or evaluation set.
    type Example;
    /// A collated micro-batch on the model's device.
    type Batch;

    /// Names of the statistics [`LossOutput::metrics`] carries, in order
    /// (every batch reports all of them, so ranks can sum them blindly).
    fn metric_names(&self) -> Vec<&'static str>;

    /// Length of a row in tokens (`group_by_length` sorts by it).
    fn example_len(&self, example: &Self::Example) -> usize;

    /// A stable fingerprint of a prepared dataset (a resumed run must train
    /// on the same rows: see [`super::output_dir`]).
    fn fingerprint(&self, examples: &[Self::Example]) -> String;

    /// Collates rows into one micro-batch (transformers' `data_collator`).
    fn collate(&self, examples: &[&Self::Example], device: Device) -> Self::Batch;

    /// Tokens of `batch` that take loss; a step's loss is divided by the sum
    /// over its accumulation window (transformers' `num_items_in_batch`).
    fn num_loss_tokens(&self, batch: &Self::Batch) -> i64;

    /// Token slots the model runs on, padding included (`input_ids.numel()`,
    /// what transformers' `floating_point_ops` counts for `total_flos`).
    fn num_input_slots(&self, batch: &Self::Batch) -> i64;

    /// The loss of `batch` (transformers' `compute_loss`). In training
    /// (`train`), dropout is active and the loss — summed over tokens and
    /// divided by `num_items` — is backpropagated; in evaluation nothing keeps
    /// a graph and the loss is the batch's own mean (`prediction_step`).
    fn compute_loss(
        &self,
        model: &M,
        batch: &Self::Batch,
        num_items: Option<i64>,
        train: bool,
    ) -> Result<LossOutput, TrainerError>;
}
