//! Packing tokenized examples into `max_length` blocks, by the rules of TRL
//! 1.16's `pack_dataset` (trl/data_utils.py), so that a packed run trains on
//! the same blocks, in the same order, as TRL does:
//!
//! - **bfd** (best-fit decreasing): sequences longer than the block are cut to
//!   their first `seq_length` tokens; empty ones are dropped; then, longest
//!   first (ties in dataset order), each goes into the open block with the
//!   least free space that still holds it (among equals the one that got that
//!   free space first), or opens a new block. A block lists its sequences'
//!   lengths (`seq_lengths`), so the collator can restart positions and keep
//!   attention inside each sequence.
//! - **bfd_split**: the same, but a long sequence is split into pieces of
//!   `seq_length` tokens (the last one shorter), each packed as a sequence.
//! - **wrapped**: everything concatenated and cut every `seq_length` tokens,
//!   ignoring sequence boundaries (no `seq_lengths`; such blocks are collated
//!   like ordinary examples).
//!
//! TRL packs through `Dataset.map(batched=True)`, whose batches hold 1,000
//! examples: blocks never mix examples of different batches, and the last
//! block of each batch may be short. [`pack_examples`] does the same.

use super::tokenize::TokenizedExample;
use std::collections::{BTreeMap, VecDeque};

/// How [`pack_examples`] fills blocks (SFTConfig's `packing_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PackingStrategy {
    #[default]
    Bfd,
    BfdSplit,
    Wrapped,
}

/// Examples per `Dataset.map` batch in TRL's packing (🤗 datasets' default `batch_size`).
pub const MAP_BATCH_SIZE: usize = 1000;

/// Packs `examples` into blocks of at most `seq_length` tokens (see the module
/// docs). Returns the blocks in TRL's order; `seq_lengths` is set for the bfd
/// strategies, `truncated_tokens` counts what bfd cut from the block's sequences.
pub fn pack_examples(
    examples: &[TokenizedExample],
    seq_length: usize,
    strategy: PackingStrategy,
) -> Vec<TokenizedExample> {
    let seq_length = seq_length.max(1);
    examples
        .chunks(MAP_BATCH_SIZE)
        .flat_map(|chunk| match strategy {
            PackingStrategy::Bfd => pack_bfd(chunk, seq_length, false),
            PackingStrategy::BfdSplit => pack_bfd(chunk, seq_length, true),
            PackingStrategy::Wrapped => pack_wrapped(chunk, seq_length),
        })
        .collect()
}

/// A sequence to place: ids, labels and the tokens cut from it.
struct Piece<'a> {
    input_ids: &'a [i64],
    labels: &'a [i64],
    cut: usize,
}

fn pack_bfd(chunk: &[TokenizedExample], seq_length: usize, split: bool) -> Vec<TokenizedExample> {
    let mut pieces: Vec<Piece> = Vec::new();
    for e in chunk.iter().filter(|e| !e.input_ids.is_empty()) {
        // Labels follow the ids; a shorter labels list (not produced here) is cut alike.
        let n = e.input_ids.len().min(e.labels.len());
        let (ids, labels) = (&e.input_ids[..n], &e.labels[..n]);
        if split {
            let mut start = 0;
            while start < n {
                let end = (start + seq_length).min(n);
                pieces.push(Piece {
                    input_ids: &ids[start..end],
                    labels: &labels[start..end],
                    cut: 0,
                });
                start = end;
            }
        } else {
            let end = n.min(seq_length);
            pieces.push(Piece {
                input_ids: &ids[..end],
                labels: &labels[..end],
                cut: n - end,
            });
        }
    }
    // Longest first; the sort is stable, so equal lengths keep dataset order.
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pieces[i].input_ids.len()));

    // Open blocks by free space; each queue in the order the blocks reached that space.
    let mut by_space: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new();
    for i in order {
        let len = pieces[i].input_ids.len();
        // The tightest fit among blocks with room left; a full-size block otherwise.
        let fit = by_space
            .range(len..seq_length)
            .next()
            .map(|(&space, _)| space);
        let bin = match fit {
            Some(space) => {
                let queue = by_space.get_mut(&space).expect("listed space");
                let bin = queue.pop_front().expect("queues are never left empty");
                if queue.is_empty() {
                    by_space.remove(&space);
                }
                bin
            }
            None => {
                bins.push((Vec::new(), 0));
                bins.len() - 1
            }
        };
        bins[bin].0.push(i);
        bins[bin].1 += len;
        let space = seq_length - bins[bin].1;
        if space > 0 {
            by_space.entry(space).or_default().push_back(bin);
        }
    }
    bins.into_iter()
        .map(|(members, total)| {
            let mut input_ids = Vec::with_capacity(total);
            let mut labels = Vec::with_capacity(total);
            let mut seq_lengths = Vec::with_capacity(members.len());
            let mut cut = 0;
            for i in members {
                input_ids.extend_from_slice(pieces[i].input_ids);
                labels.extend_from_slice(pieces[i].labels);
                seq_lengths.push(pieces[i].input_ids.len());
                cut += pieces[i].cut;
            }
            TokenizedExample {
                text: String::new(),
                input_ids,
                labels,
                truncated_tokens: cut,
                seq_lengths: Some(seq_lengths),
            }
        })
        .collect()
}

fn pack_wrapped(chunk: &[TokenizedExample], seq_length: usize) -> Vec<TokenizedExample> {
    let ids: Vec<i64> = chunk
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    let labels: Vec<i64> = chunk
        .iter()
        .flat_map(|e| e.labels.iter().copied())
        .collect();
    ids.chunks(seq_length)
        .zip(labels.chunks(seq_length))
        .map(|(i, l)| TokenizedExample {
            text: String::new(),
            input_ids: i.to_vec(),
            labels: l.to_vec(),
            truncated_tokens: 0,
            seq_lengths: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: Vec<i64>) -> TokenizedExample {
        TokenizedExample {
            text: String::new(),
            labels: ids.clone(),
            input_ids: ids,
            truncated_tokens: 0,
            seq_lengths: None,
        }
    }

    /// The example in the docstring of TRL's `pack_dataset`.
    #[test]
    fn trl_docstring_example() {
        let data = [
            ex(vec![1, 2, 3, 4, 5]),
            ex(vec![6, 7]),
            ex(vec![8, 9, 10]),
            ex(vec![11]),
        ];
        let ids =
            |v: &[TokenizedExample]| v.iter().map(|e| e.input_ids.clone()).collect::<Vec<_>>();
        let lens =
            |v: &[TokenizedExample]| v.iter().map(|e| e.seq_lengths.clone()).collect::<Vec<_>>();
        let bfd = pack_examples(&data, 4, PackingStrategy::Bfd);
        assert_eq!(
            ids(&bfd),
            [vec![1, 2, 3, 4], vec![8, 9, 10, 11], vec![6, 7]]
        );
        assert_eq!(lens(&bfd), [Some(vec![4]), Some(vec![3, 1]), Some(vec![2])]);
        assert_eq!(bfd[0].truncated_tokens, 1);
        let split = pack_examples(&data, 4, PackingStrategy::BfdSplit);
        assert_eq!(
            ids(&split),
            [vec![1, 2, 3, 4], vec![8, 9, 10, 5], vec![6, 7, 11]]
        );
        assert_eq!(
            lens(&split),
            [Some(vec![4]), Some(vec![3, 1]), Some(vec![2, 1])]
        );
        let wrapped = pack_examples(&data, 4, PackingStrategy::Wrapped);
        assert_eq!(
            ids(&wrapped),
            [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10, 11]]
        );
    }
}
