//! Padded batches computed on their real tokens only.
//!
//! A padded batch `[batch, seq]` (TRL's collator pads on the right) spends
//! compute on every padding slot: 42 % of the slots of the tutorial's batches.
//! [`unpad`] lays the real tokens of each row back to back in one row
//! `[1, total]`, with the positions they had in the padded batch and attention
//! within each row only — the padding-free layout the model already runs
//! (`CausalLMInput::seq_lens`). Every real token then sees exactly the keys and
//! the rotary positions it saw in the padded batch, and predicts the same
//! label, so loss, entropy and accuracy equal the dense computation up to
//! float rounding. What a run reports about the batch (`num_tokens` from the
//! padded attention mask, `total_flos` from the padded slots) is read from the
//! padded batch as before.
//!
//! LoRA dropout stays exact too: inside [`with_padded_rows`], an adapter draws
//! its dropout mask for the padded shape — the same draws, in the same order,
//! as the dense pass — and keeps the rows of the real tokens ([`dropout`]).

use super::tokenize::IGNORE_INDEX;
use super::Batch;
use std::cell::RefCell;
use tch::{Kind, Tensor};

/// The real tokens of a padded batch, back to back.
///
/// # Shapes
/// `input_ids`, `labels`, `position_ids`: `[1, total]` int64.
#[derive(Debug)]
pub struct Unpadded {
    pub input_ids: Tensor,
    /// The padded labels of the real tokens, -100 at the first token of each
    /// row: after the causal shift it would be the target of the previous
    /// row's last token, which in the padded batch predicts a padding label.
    pub labels: Tensor,
    /// Each token's column in the padded batch (its position there).
    pub position_ids: Tensor,
    /// Real tokens per non-empty row, in row order (summing to `total`).
    pub seq_lens: Vec<i64>,
    /// Where each token came from, for dropout masks drawn as the dense pass draws them.
    pub rows: PaddedRows,
}

/// Which slots of the flattened padded batch `[batch * seq]` the unpadded
/// tokens came from.
#[derive(Debug)]
pub struct PaddedRows {
    /// `[total]` int64, increasing.
    pub index: Tensor,
    /// `batch * seq`.
    pub slots: i64,
}

impl PaddedRows {
    fn shallow_clone(&self) -> Self {
        Self {
            index: self.index.shallow_clone(),
            slots: self.slots,
        }
    }
}

/// The unpadded form of `batch`, or `None` when computing it dense is as cheap
/// or when the two would not be exact equals:
/// - no padding (nothing to gain), or already padding-free;
/// - padding other than on the right (left padding makes a padding slot
///   predict the first real label in the dense pass);
/// - a label other than -100 on a padding slot (the last real token would
///   predict it in the dense pass).
///
/// TRL's collator (and [`super::collate`]) always pads on the right with -100
/// labels, so its padded batches are always unpadded.
pub fn unpad(batch: &Batch) -> Option<Unpadded> {
    if !batch.has_padding || batch.position_ids.is_some() || batch.seq_lens.is_some() {
        return None;
    }
    let (rows, width) = batch.attention_mask.size2().ok()?;
    let device = batch.input_ids.device();
    let real = batch.attention_mask.ne(0);
    let lens_t = real.sum_dim_intlist(1, false, Kind::Int64);
    let lens: Vec<i64> = Vec::try_from(&lens_t.to_device(tch::Device::Cpu)).ok()?;
    let total: i64 = lens.iter().sum();
    if total == 0 {
        return None;
    }
    let columns = Tensor::arange(width, (Kind::Int64, device)).unsqueeze(0);
    let right_padded = columns.lt_tensor(&lens_t.unsqueeze(1)).eq_tensor(&real);
    let clean_pad_labels = batch
        .labels
        .masked_select(&real.logical_not())
        .eq(IGNORE_INDEX)
        .all();
    if !(right_padded.all().int64_value(&[]) == 1 && clean_pad_labels.int64_value(&[]) == 1) {
        return None;
    }
    let index = real.view([-1]).nonzero().view([-1]);
    let gather = |t: &Tensor| t.reshape([-1]).index_select(0, &index).view([1, total]);
    let seq_lens: Vec<i64> = lens.into_iter().filter(|&l| l > 0).collect();
    let starts: Vec<i64> = seq_lens
        .iter()
        .scan(0, |acc, &l| {
            let s = *acc;
            *acc += l;
            Some(s)
        })
        .collect();
    let starts = Tensor::from_slice(&starts).to_device(device);
    let labels = gather(&batch.labels).index_fill(1, &starts, IGNORE_INDEX);
    Some(Unpadded {
        input_ids: gather(&batch.input_ids),
        labels,
        position_ids: index.remainder(width).view([1, total]),
        seq_lens,
        rows: PaddedRows {
            index,
            slots: rows * width,
        },
    })
}

thread_local! {
    static PADDED_ROWS: RefCell<Option<PaddedRows>> = const { RefCell::new(None) };
}

/// Runs `f` with `rows` as the layout [`dropout`] draws its masks for; the
/// previous layout is restored afterwards, also when `f` panics.
pub fn with_padded_rows<R>(rows: &PaddedRows, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<PaddedRows>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            PADDED_ROWS.with(|r| *r.borrow_mut() = previous);
        }
    }
    let previous = PADDED_ROWS.with(|r| r.borrow_mut().replace(rows.shallow_clone()));
    let _restore = Restore(previous);
    f()
}

/// Training-mode dropout of `x` (`[..., features]`) with probability `p`.
///
/// Inside [`with_padded_rows`], when `x` holds one row per unpadded token, the
/// mask is drawn for the padded batch's `[batch * seq, features]` — the very
/// draws the dense pass makes — and the real tokens' rows are kept, so the
/// unpadded pass drops exactly what the dense one drops.
pub fn dropout(x: &Tensor, p: f64) -> Tensor {
    let size = x.size();
    let features = *size.last().unwrap_or(&1);
    let tokens = x.numel() as i64 / features.max(1);
    let noise = PADDED_ROWS.with(|r| {
        let rows = r.borrow();
        let rows = rows.as_ref()?;
        (rows.index.size1().ok()? == tokens).then(|| {
            // 1 · (mask / (1 - p)) is the dense pass's noise, bit for bit.
            Tensor::ones([rows.slots, features], (x.kind(), x.device()))
                .dropout(p, true)
                .index_select(0, &rows.index)
                .view(size.as_slice())
        })
    });
    match noise {
        Some(noise) => x * noise,
        None => x.dropout(p, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::collate;
    use crate::data::TokenizedExample;
    use tch::Device;

    fn ex(ids: &[i64]) -> TokenizedExample {
        TokenizedExample {
            text: String::new(),
            input_ids: ids.to_vec(),
            labels: ids.to_vec(),
            truncated_tokens: 0,
            seq_lengths: None,
        }
    }

    #[test]
    fn real_tokens_back_to_back_with_their_padded_positions() {
        let (a, b, c) = (ex(&[1, 2, 3]), ex(&[4, 5]), ex(&[6, 7, 8, 9]));
        let batch = collate(&[&a, &b, &c], 0, None, Device::Cpu);
        let u = unpad(&batch).expect("right-padded");
        let row = |t: &Tensor| Vec::<Vec<i64>>::try_from(t).unwrap().remove(0);
        assert_eq!(row(&u.input_ids), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(row(&u.position_ids), [0, 1, 2, 0, 1, 0, 1, 2, 3]);
        assert_eq!(row(&u.labels), [-100, 2, 3, -100, 5, -100, 7, 8, 9]);
        assert_eq!(u.seq_lens, [3, 2, 4]);
        assert_eq!(u.rows.slots, 12);
        assert_eq!(
            Vec::<i64>::try_from(&u.rows.index).unwrap(),
            [0, 1, 2, 4, 5, 8, 9, 10, 11]
        );
    }

    #[test]
    fn only_right_padding_with_ignored_pad_labels_is_unpadded() {
        let (a, b) = (ex(&[1, 2, 3]), ex(&[4, 5]));
        let same = collate(&[&a, &a], 0, None, Device::Cpu);
        assert!(unpad(&same).is_none(), "no padding: dense is as cheap");
        let mut left = collate(&[&a, &b], 0, None, Device::Cpu);
        left.attention_mask = Tensor::from_slice(&[1i64, 1, 1, 0, 1, 1]).view([2, 3]);
        assert!(unpad(&left).is_none(), "left padding stays dense");
        let mut labelled = collate(&[&a, &b], 0, None, Device::Cpu);
        labelled.labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 7]).view([2, 3]);
        assert!(unpad(&labelled).is_none(), "a label on padding stays dense");
    }

    #[test]
    fn dropout_draws_the_dense_mask_for_the_real_rows() {
        let (a, b) = (ex(&[1, 2, 3]), ex(&[4, 5]));
        let batch = collate(&[&a, &b], 0, None, Device::Cpu);
        let u = unpad(&batch).unwrap();
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        tch::manual_seed(5);
        let dense = x
            .dropout(0.3, true)
            .view([6, 16])
            .index_select(0, &u.rows.index);
        let real = x
            .view([6, 16])
            .index_select(0, &u.rows.index)
            .view([1, 5, 16]);
        tch::manual_seed(5);
        let unpadded = with_padded_rows(&u.rows, || dropout(&real, 0.3));
        assert!(unpadded.view([5, 16]).equal(&dense));
        // Outside the scope: a plain dropout of the given shape.
        tch::manual_seed(5);
        let plain = dropout(&real, 0.3);
        tch::manual_seed(5);
        assert!(plain.equal(&real.dropout(0.3, true)));
    }
}
