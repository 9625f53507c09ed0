//! TRL's `DataCollatorForLanguageModeling` without packing: pad every sequence
//! of a batch to the longest (or to a multiple of `pad_to_multiple_of`) on the
//! right, labels -100 on padding, and an attention mask.

use super::tokenize::{TokenizedExample, IGNORE_INDEX};
use tch::{Device, Tensor};

/// A padded batch.
///
/// # Shapes
/// each tensor is `[batch, seq]` int64.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
    /// Whether any row has padding (when not, attention can skip the dense mask).
    pub has_padding: bool,
    /// Positions that take loss after the causal shift (labels[:, 1:] != -100).
    pub num_loss_tokens: i64,
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
        ids.extend(std::iter::repeat(pad_token_id).take(pad));
        mask.extend(std::iter::repeat(1i64).take(e.input_ids.len()));
        mask.extend(std::iter::repeat(0i64).take(pad));
        labels.extend_from_slice(&e.labels);
        labels.extend(std::iter::repeat(IGNORE_INDEX).take(pad));
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
    fn pads_to_a_multiple() {
        let a = ex(&[1, 2, 3], &[1, 2, 3]);
        let batch = collate(&[&a], 0, Some(4), Device::Cpu);
        assert_eq!(batch.input_ids.size(), [1, 4]);
        assert!(batch.has_padding);
    }
}
