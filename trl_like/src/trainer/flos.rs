//! `total_flos` as transformers counts it: each micro-batch adds
//! `ModuleUtilsMixin.floating_point_ops`, i.e. 6 × `input_ids.numel()` ×
//! `num_parameters(exclude_embeddings=True)` (forward + backward, the
//! quadratic attention term neglected). Padding counts, as it does there: the
//! model runs on it. With LoRA the adapter weights are counted too, since PEFT
//! injects them into the modules transformers counts.

use super::{Trainer, TrainingHooks};
use crate::modeling::PreTrainedModel;

/// Whether a base weight belongs to an embedding table (transformers leaves
/// out the `.weight` of every `nn.Embedding`; in HF names those modules are
/// called `embed_tokens`, `wte`, `word_embeddings`, `embed_positions`, …).
pub fn is_embedding_weight(name: &str) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("embed") || last == "wte" || last == "wpe"
}

impl<M: PreTrainedModel, H: TrainingHooks<M>> Trainer<M, H> {
    /// Parameters transformers' `floating_point_ops` multiplies by: every
    /// weight of the model (adapters included) except the embedding tables.
    pub fn non_embedding_parameters(&self) -> i64 {
        let (_, total) = self.trainable_parameters();
        let embeddings: i64 = self
            .model
            .named_parameters()
            .iter()
            .filter(|(name, _)| is_embedding_weight(name))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        total - embeddings
    }
}

/// `6 × token slots × parameters`: the forward and backward work of one
/// micro-batch (the quadratic attention term neglected, as transformers does).
pub fn floating_point_ops(non_embedding_parameters: i64, input_slots: i64) -> f64 {
    6.0 * input_slots as f64 * non_embedding_parameters as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batch;

    #[test]
    fn embedding_tables_are_recognised_by_name() {
        assert!(is_embedding_weight("model.embed_tokens.weight"));
        assert!(is_embedding_weight("transformer.wte.weight"));
        assert!(!is_embedding_weight("lm_head.weight"));
        assert!(!is_embedding_weight(
            "model.layers.0.self_attn.q_proj.weight"
        ));
        assert!(!is_embedding_weight("model.embed_tokens.bias_like"));
    }

    #[test]
    fn six_times_tokens_times_parameters_padding_included() {
        let batch = |rows: i64, cols: i64| Batch {
            input_ids: tch::Tensor::zeros([rows, cols], (tch::Kind::Int64, tch::Device::Cpu)),
            attention_mask: tch::Tensor::ones([rows, cols], (tch::Kind::Int64, tch::Device::Cpu)),
            labels: tch::Tensor::zeros([rows, cols], (tch::Kind::Int64, tch::Device::Cpu)),
            has_padding: false,
            num_loss_tokens: 0,
            position_ids: None,
            seq_lens: None,
        };
        let slots = batch(2, 5).input_ids.numel() + batch(1, 7).input_ids.numel();
        assert_eq!(floating_point_ops(1000, slots as i64), 6.0 * 17.0 * 1000.0);
    }
}
