//! TRL's `DataCollatorForLanguageModeling`: pad every sequence of a batch to
//! the longest (or to a multiple of `pad_to_multiple_of`) on the right, labels
//! -100 on padding, and an attention mask; or, padding-free, lay the batch's
//! sequences back to back in one row with positions restarting at 0 for each.

use super::tokenize::{TokenizedExample, IGNORE_INDEX};
use tch::{Device, Tensor};

/// A collated batch.
///
/// # Shapes
/// each tensor is `[batch, seq]` int64; a padding-free batch is `[1, total]`.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    /// Padding-free batches: all ones (TRL counts every slot of the row as a token).
    pub attention_mask: Tensor,
    pub labels: Tensor,
    /// Whether any row has padding (when not, attention can skip the dense mask).
    pub has_padding: bool,
    /// Positions that take loss after the causal shift (labels[:, 1:] != -100).
    pub num_loss_tokens: i64,
    /// Padding-free batches: positions restarting at 0 for each sequence.
    pub position_ids: Option<Tensor>,
    /// Padding-free batches: the lengths of the sequences in the row, in order
    /// (a new one starts wherever `position_ids` is 0, as TRL's `cu_seq_lens`).
    pub seq_lens: Option<Vec<i64>>,
}

/// Collates with TRL's rules: [`collate_padding_free`] when `padding_free`
/// (SFTConfig's `padding_free`, or packing with a bfd strategy), else [`collate`].
pub fn collate_with(
    examples: &[&TokenizedExample],
    pad_token_id: i64,
    pad_to_multiple_of: Option<usize>,
    padding_free: bool,
    device: Device,
) -> Batch {
    if padding_free {
        collate_padding_free(examples, pad_token_id, pad_to_multiple_of, device)
    } else {
        collate(examples, pad_token_id, pad_to_multiple_of, device)
    }
}

/// Pads `examples` into one batch.
pub fn collate(
    examples: &[&TokenizedExample],
    pad_token_id: i64,
    pad_to_multiple_of: Option<usize>,
    device: Device,
) -> Batch {
    let longest = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let width = match pad_to_multiple_of {
        Some(m) if m > 1 => longest.div_ceil(m) * m,
        _ => longest,
    };
    let rows = examples.len();
    let mut ids = Vec::with_capacity(rows * width);
    let mut mask = Vec::with_capacity(rows * width);
    let mut labels = Vec::with_capacity(rows * width);
    let mut num_loss_tokens = 0;
    for e in examples {
        let pad = width - e.input_ids.len();
        ids.extend_from_slice(&e.input_ids);
        ids.extend(std::iter::repeat_n(pad_token_id, pad));
        mask.extend(std::iter::repeat_n(1i64, e.input_ids.len()));
        mask.extend(std::iter::repeat_n(0i64, pad));
        labels.extend_from_slice(&e.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        num_loss_tokens += e
            .labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count() as i64;
    }
    let shape = [rows as i64, width as i64];
    let to = |v: Vec<i64>| Tensor::from_slice(&v).view(shape).to_device(device);
    Batch {
        has_padding: examples.iter().any(|e| e.input_ids.len() < width),
        input_ids: to(ids),
        attention_mask: to(mask),
        labels: to(labels),
        num_loss_tokens,
        position_ids: None,
        seq_lens: None,
    }
}

/// TRL's `DataCollatorForLanguageModeling(padding_free=True)`: the examples'
/// ids and labels concatenated into one row `[1, total]`, no attention mask.
///
/// - `position_ids` count from 0 within each sequence: each example is one
///   sequence, or, packed, the sequences its `seq_lengths` list.
/// - The label at every position 0 becomes -100: after the causal shift it is
///   the target of the previous sequence's last token, which must not learn to
///   predict the next sequence's first token.
/// - `pad_to_multiple_of` pads the row with `pad_token_id`, label -100 and
///   position 0, so each pad counts as a sequence of its own (as TRL's
///   `cu_seq_lens` and transformers' packed-sequence masks treat it).
pub fn collate_padding_free(
    examples: &[&TokenizedExample],
    pad_token_id: i64,
    pad_to_multiple_of: Option<usize>,
    device: Device,
) -> Batch {
    let total: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let width = match pad_to_multiple_of {
        Some(m) if m > 1 => total.div_ceil(m) * m,
        _ => total,
    };
    let mut ids = Vec::with_capacity(width);
    let mut labels = Vec::with_capacity(width);
    let mut positions: Vec<i64> = Vec::with_capacity(width);
    for e in examples {
        ids.extend_from_slice(&e.input_ids);
        labels.extend_from_slice(&e.labels);
        match &e.seq_lengths {
            Some(lens) if lens.iter().sum::<usize>() == e.input_ids.len() => {
                for &len in lens {
                    positions.extend(0..len as i64);
                }
            }
            _ => positions.extend(0..e.input_ids.len() as i64),
        }
    }
    ids.resize(width, pad_token_id);
    labels.resize(width, IGNORE_INDEX);
    positions.resize(width, 0);
    let mut seq_lens = Vec::new();
    for (label, &pos) in labels.iter_mut().zip(&positions) {
        if pos == 0 {
            *label = IGNORE_INDEX;
            seq_lens.push(0);
        }
        if let Some(last) = seq_lens.last_mut() {
            *last += 1;
        }
    }
    let num_loss_tokens = labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count() as i64;
    let shape = [1, width as i64];
    let to = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    Batch {
        input_ids: to(&ids),
        attention_mask: Tensor::ones(shape, (tch::Kind::Int64, device)),
        labels: to(&labels),
        has_padding: false,
        num_loss_tokens,
        position_ids: Some(to(&positions)),
        seq_lens: Some(seq_lens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[i64], labels: &[i64]) -> TokenizedExample {
        TokenizedExample {
            text: String::new(),
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            truncated_tokens: 0,
            seq_lengths: None,
        }
    }

    #[test]
    fn pads_right_with_ignored_labels() {
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let b = ex(&[4, 5], &[-100, 5]);
        let batch = collate(&[&a, &b], 0, None, Device::Cpu);
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.input_ids).unwrap(),
            vec![vec![1, 2, 3], vec![4, 5, 0]]
        );
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.attention_mask).unwrap(),
            vec![vec![1, 1, 1], vec![1, 1, 0]]
        );
        assert_eq!(
            Vec::<Vec<i64>>::try_from(&batch.labels).unwrap(),
            vec![vec![1, 2, 3], vec![-100, 5, -100]]
        );
        assert!(batch.has_padding);
        assert_eq!(batch.num_loss_tokens, 3);
    }

    #[test]
    fn padding_free_restarts_positions_and_ignores_first_labels() {
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let mut packed = ex(&[4, 5, 6, 7], &[4, -100, 6, 7]);
        packed.seq_lengths = Some(vec![1, 3]);
        let batch = collate_padding_free(&[&a, &packed], 0, Some(4), Device::Cpu);
        let rows = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).unwrap();
        assert_eq!(rows(&batch.input_ids), [[1, 2, 3, 4, 5, 6, 7, 0]]);
        assert_eq!(
            rows(batch.position_ids.as_ref().unwrap()),
            [[0, 1, 2, 0, 0, 1, 2, 0]]
        );
        assert_eq!(rows(&batch.labels), [[-100, 2, 3, -100, -100, 6, 7, -100]]);
        assert_eq!(batch.seq_lens.as_deref(), Some(&[3, 1, 3, 1][..]));
        assert_eq!(rows(&batch.attention_mask), [[1; 8]]);
        assert_eq!(batch.num_loss_tokens, 4);
        assert!(!batch.has_padding);
    }

    #[test]
    fn pads_to_a_multiple() {
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let batch = collate(&[&a], 0, Some(4), Device::Cpu);
        assert_eq!(batch.input_ids.size(), [1, 4]);
        assert!(batch.has_padding);
    }
}
