//! Dataset preparation with packing (TRL's `pack_dataset` after tokenization).

use super::{prepare_dataset, FormattingFunc, PrepareStats, TrainerError};
use crate::config::SFTConfig;
use crate::data::packing::{pack_examples, PackingStrategy};
use crate::data::{Dataset, DatasetFormat, TokenizedExample};
use crate::tokenizer::PreTrainedTokenizer;

/// [`prepare_dataset`], then, when `packing`, TRL's `pack_dataset` into
/// `max_length` blocks ([`pack_examples`]). As in TRL, packing replaces the
/// per-example truncation: bfd cuts long sequences at `max_length` itself,
/// bfd_split and wrapped keep every token.
pub fn prepare_and_pack(
    dataset: &Dataset,
    tokenizer: &PreTrainedTokenizer,
    args: &SFTConfig,
    formatting_func: Option<&FormattingFunc>,
    packing: bool,
) -> Result<(Vec<TokenizedExample>, PrepareStats), TrainerError> {
    let (Some(block), true) = (args.max_length, packing) else {
        return prepare_dataset(
            dataset,
            tokenizer,
            args,
            DatasetFormat::Auto,
            formatting_func,
            false,
        );
    };
    let whole = SFTConfig {
        max_length: None,
        ..args.clone()
    };
    let (examples, mut stats) = prepare_dataset(
        dataset,
        tokenizer,
        &whole,
        DatasetFormat::Auto,
        formatting_func,
        false,
    )?;
    let strategy = match args.packing_strategy {
        crate::config::PackingStrategy::Bfd => PackingStrategy::Bfd,
        crate::config::PackingStrategy::BfdSplit => PackingStrategy::BfdSplit,
        crate::config::PackingStrategy::Wrapped => PackingStrategy::Wrapped,
    };
    if strategy == PackingStrategy::Bfd {
        stats.truncated = examples
            .iter()
            .filter(|e| e.input_ids.len() > block)
            .count();
    }
    Ok((pack_examples(&examples, block, strategy), stats))
}
