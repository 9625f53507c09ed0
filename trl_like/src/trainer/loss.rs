//! The causal-LM loss of SFT: `lm_head` + cross-entropy over sequence chunks,
//! with the statistics TRL logs beside the loss (entropy of the predicted
//! distributions and token accuracy), from one `log_softmax` per chunk.
//!
//! Two implementations compute the same numbers: the fused C++ autograd node
//! ([`crate::ops::fused_lm_loss`], the default whenever the model exposes a
//! plain head weight) and [`chunked_lm_loss_plain`], built from tch calls.
//! `TRL_LIKE_FUSED_LM_LOSS=0` in the environment forces the plain one.

use crate::data::tokenize::IGNORE_INDEX;
use crate::modeling::CausalLM;
use std::sync::OnceLock;
use tch::{Kind, Reduction, Tensor};

/// Tokens per loss chunk: the fp32 logits of one chunk are `chunk × vocab`
/// (256 × 151,552 × 4 B = 155 MB for GLM-4) instead of the whole batch's
/// (2 × 512 tokens: 620 MB, plus their gradient).
pub const LOSS_CHUNK_TOKENS: i64 = 256;

/// What [`chunked_lm_loss`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmLoss {
    /// Summed token losses / `denom`.
    pub loss: f64,
    /// Mean entropy of the predicted distributions at the positions that take loss.
    pub entropy: f64,
    /// Share of loss tokens whose argmax prediction is the label.
    pub accuracy: f64,
}

/// transformers' `ForCausalLMLoss` (shifted labels, `-100` ignored, logits in
/// fp32) divided by `denom`, computed `chunk_tokens` tokens at a time so the
/// whole `[batch, seq, vocab]` logits never exist; with `backward`, the loss
/// is backpropagated into `hidden`'s graph.
///
/// Runs the fused operation when the model's head is a plain weight
/// ([`CausalLM::lm_head_weight`]) and the environment does not turn it off,
/// else [`chunked_lm_loss_plain`].
///
/// # Shapes
/// `hidden`: `[batch, seq, hidden]` (after the final norm); `labels`: `[batch, seq]`.
pub fn chunked_lm_loss<M: CausalLM + ?Sized>(
    model: &M,
    hidden: &Tensor,
    labels: &Tensor,
    denom: f64,
    backward: bool,
    chunk_tokens: i64,
) -> LmLoss {
    if fused_enabled() {
        if let Some(weight) = model.lm_head_weight() {
            return fused_lm_loss(hidden, &weight, labels, denom, backward, chunk_tokens)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    chunked_lm_loss_plain(model, hidden, labels, denom, backward, chunk_tokens)
}

/// Whether [`chunked_lm_loss`] may take the fused path (`TRL_LIKE_FUSED_LM_LOSS`
/// unset, or anything but `0` / `false`), read once.
fn fused_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("TRL_LIKE_FUSED_LM_LOSS")
            .map(|v| !matches!(v.trim(), "0" | "false" | "False"))
            .unwrap_or(true)
    })
}

/// [`chunked_lm_loss`] through the fused autograd node: one node for the
/// whole loss that forms each chunk's cross-entropy gradient as soon as the
/// chunk's log-probabilities exist (no per-chunk autograd graph, no
/// full-size gradient per chunk, no second pass over the logits). `weight`
/// is the head's `[vocab, hidden]` matrix (no bias); it gets a gradient only
/// if it requires one.
///
/// # Errors
/// When libtorch rejects the inputs (shapes, dtypes); nothing has been
/// backpropagated then.
pub fn fused_lm_loss(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    denom: f64,
    backward: bool,
    chunk_tokens: i64,
) -> Result<LmLoss, crate::ops::OpsError> {
    let run = || {
        crate::ops::fused_lm_loss(
            hidden,
            weight,
            labels,
            denom,
            chunk_tokens.max(1),
            IGNORE_INDEX,
        )
    };
    let out = if backward { run() } else { tch::no_grad(run) }?;
    let per_chunk = Vec::<f64>::try_from(
        out.stats
            .reshape([-1])
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Double),
    )
    .map_err(|e| crate::ops::OpsError::Torch {
        op: "fused LM-head cross-entropy",
        message: format!("reading its results: {e}"),
    })?;
    // A sequence of one token has no position to predict: nothing to backpropagate.
    if backward && !per_chunk.is_empty() && out.loss.requires_grad() {
        out.loss.backward();
    }
    // Summed in f64 chunk by chunk, in the plain path's order: the same totals.
    let mut stats = ChunkStats::default();
    for s in per_chunk.chunks_exact(4) {
        stats.loss += s[0];
        stats.entropy_sum += s[1];
        stats.correct += s[2];
        stats.valid += s[3];
    }
    Ok(stats.finish())
}

/// [`chunked_lm_loss`] from tch calls: each chunk's loss is backpropagated
/// into a detached copy of `hidden`, and the summed gradient then flows into
/// `hidden`'s graph once. The reference the fused path is tested against, and
/// the path for heads without a plain weight (adapters on `lm_head`).
pub fn chunked_lm_loss_plain<M: CausalLM + ?Sized>(
    model: &M,
    hidden: &Tensor,
    labels: &Tensor,
    denom: f64,
    backward: bool,
    chunk_tokens: i64,
) -> LmLoss {
    let (b, t, _) = hidden
        .size3()
        .expect("hidden states are [batch, seq, hidden]");
    // Positions 0..t-1 predict labels 1..t.
    let positions = t - 1;
    let chunk = (chunk_tokens / b.max(1)).max(1);
    let leaf = hidden.detach().set_requires_grad(backward);
    let mut stats = ChunkStats::default();
    let mut start = 0;
    while start < positions {
        let len = chunk.min(positions - start);
        let h = leaf.narrow(1, start, len);
        let y = labels.narrow(1, start + 1, len).reshape([-1]);
        let run = || {
            // Logits in fp32 whatever the model dtype, as transformers upcasts them.
            let logits = model.lm_head(&h).to_kind(Kind::Float);
            let v = logits.size()[2];
            // cross_entropy = log_softmax + nll_loss; keeping the log-probabilities
            // lets the entropy below reuse them instead of a second softmax.
            let logp = logits.reshape([-1, v]).log_softmax(-1, Kind::Float);
            let summed = logp.nll_loss_nd::<Tensor>(&y, None, Reduction::Sum, IGNORE_INDEX) / denom;
            (logp, summed)
        };
        let (logp, chunk_loss) = if backward { run() } else { tch::no_grad(run) };
        stats.add(&logp, &y);
        stats.loss += chunk_loss.double_value(&[]);
        if backward {
            chunk_loss.backward();
        }
        start += len;
    }
    // A sequence of one token has no position to predict: nothing reached the leaf.
    if backward && hidden.requires_grad() && leaf.grad().defined() {
        (hidden * leaf.grad()).sum(Kind::Float).backward();
    }
    stats.finish()
}

/// Running sums over the chunks of one batch.
#[derive(Default)]
struct ChunkStats {
    loss: f64,
    entropy_sum: f64,
    correct: f64,
    valid: f64,
}

impl ChunkStats {
    /// Adds one chunk's entropy and accuracy counts (`logp`: `[tokens, vocab]`).
    fn add(&mut self, logp: &Tensor, y: &Tensor) {
        tch::no_grad(|| {
            let valid = y.ne(IGNORE_INDEX);
            let valid_f = valid.to_kind(Kind::Float);
            let per_token = -(logp.exp() * logp).sum_dim_intlist(-1, false, Kind::Float);
            self.entropy_sum += (per_token * &valid_f).sum(Kind::Float).double_value(&[]);
            self.correct += logp
                .argmax(-1, false)
                .eq_tensor(y)
                .logical_and(&valid)
                .sum(Kind::Float)
                .double_value(&[]);
            self.valid += valid_f.sum(Kind::Float).double_value(&[]);
        });
    }

    fn finish(self) -> LmLoss {
        LmLoss {
            loss: self.loss,
            entropy: self.entropy_sum / self.valid.max(1.0),
            accuracy: if self.valid > 0.0 {
                self.correct / self.valid
            } else {
                0.0
            },
        }
    }
}
