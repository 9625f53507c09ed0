//! Text generation with a KV cache: transformers' `model.generate` for
//! greedy search and sampling (temperature, top-k, top-p, repetition penalty).

use crate::modeling::{CausalLM, CausalLMInput};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Errors from [`generate`] and [`GenerationConfig::from_pretrained`].
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error(
        "input_ids must be a [batch, seq] tensor with at least one token per row, got shape {0:?}"
    )]
    InputShape(Vec<i64>),
    #[error("attention_mask has shape {mask:?}, but input_ids has shape {input:?}: pass one mask value per token")]
    MaskShape { mask: Vec<i64>, input: Vec<i64> },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid generation config: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Decoding settings, with transformers' `GenerationConfig` names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationConfig {
    /// Maximum number of tokens to generate (prompt excluded).
    pub max_new_tokens: Option<usize>,
    /// Maximum total length (prompt included); used when `max_new_tokens` is unset.
    pub max_length: usize,
    /// Sample from the distribution instead of taking the argmax.
    pub do_sample: bool,
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: i64,
    /// CTRL-style penalty for tokens already in the sequence (1.0 = off).
    pub repetition_penalty: f64,
    /// Generation stops for a row when it produces any of these.
    #[serde(deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<i64>,
    /// Filler for rows that have finished while others go on.
    pub pad_token_id: Option<i64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: None,
            max_length: 20,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 50,
            repetition_penalty: 1.0,
            eos_token_id: Vec::new(),
            pad_token_id: None,
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(i64),
        Many(Vec<i64>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
        OneOrMany::Null(()) => vec![],
    })
}

impl GenerationConfig {
    /// Reads `generation_config.json` from a model directory; unknown keys are ignored.
    pub fn from_pretrained(dir: impl AsRef<Path>) -> Result<Option<Self>, GenerationError> {
        let path = dir.as_ref().join("generation_config.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(source) => return Err(GenerationError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| GenerationError::Parse { path, source })
    }

    /// How many new tokens a prompt of `prompt_len` may receive.
    pub fn budget(&self, prompt_len: usize) -> usize {
        match self.max_new_tokens {
            Some(n) => n,
            None => self.max_length.saturating_sub(prompt_len),
        }
    }
}

/// Position ids for a left-padded batch, as transformers' generate derives them:
/// `cumsum(mask) - 1`, with padding positions set to 0 (transformers 5; 4.x used 1 —
/// either way padding is masked out and never influences real tokens).
///
/// # Shapes
/// `attention_mask`: `[batch, seq]` → `[batch, seq]` int64.
pub fn position_ids_from_mask(attention_mask: &Tensor) -> Tensor {
    let pos = attention_mask.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1;
    pos.masked_fill(&attention_mask.eq(0), 0)
}

/// Called after each decoding step of [`generate`] with the new token of every row.
pub type OnStep<'a> = &'a mut dyn FnMut(&[i64]);

/// Applies repetition penalty, then (when sampling) temperature, top-k and top-p
/// to next-token scores, in the order transformers' logits processors run.
///
/// # Shapes
/// `scores`: `[batch, vocab]` fp32; `sequences`: `[batch, seq]` int64 (prompt,
/// padding included, plus everything generated so far).
// `scores /= t` would divide the caller's tensor in place (`scores` may still be
// its shallow clone).
#[allow(clippy::assign_op_pattern)]
pub fn process_logits(scores: &Tensor, sequences: &Tensor, cfg: &GenerationConfig) -> Tensor {
    let mut scores = scores.shallow_clone();
    if cfg.repetition_penalty != 1.0 {
        let seen = scores.gather(1, sequences, false);
        // torch.where(score < 0, score * penalty, score / penalty)
        let penalised = (&seen * cfg.repetition_penalty)
            .where_self(&seen.lt(0.0), &(&seen / cfg.repetition_penalty));
        scores = scores.scatter(1, sequences, &penalised);
    }
    if !cfg.do_sample {
        return scores;
    }
    if cfg.temperature != 1.0 {
        scores = scores / cfg.temperature;
    }
    let vocab = scores.size()[1];
    if cfg.top_k > 0 && cfg.top_k < vocab {
        let (top, _) = scores.topk(cfg.top_k, -1, true, true);
        let kth = top.narrow(1, cfg.top_k - 1, 1);
        scores = scores.masked_fill(&scores.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        let (sorted, order) = scores.sort(-1, false);
        let cumulative = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let remove_sorted = cumulative.le(1.0 - cfg.top_p);
        // Always keep the most likely token (transformers' min_tokens_to_keep = 1).
        let _ = remove_sorted.narrow(1, vocab - 1, 1).fill_(0);
        let remove = remove_sorted.scatter(1, &order, &remove_sorted);
        scores = scores.masked_fill(&remove, f64::NEG_INFINITY);
    }
    scores
}

/// Output of [`generate`].
pub struct GenerateOutput {
    /// `[batch, prompt + new]`: prompts followed by the new tokens; rows that
    /// stopped early are filled with the pad token, as transformers returns them.
    pub sequences: Tensor,
    /// Number of new tokens in `sequences` (same for every row).
    pub new_tokens: i64,
}

/// Generates continuations for a (left-padded) batch of prompts.
///
/// `on_step` is called after each decoding step with the new token of every row
/// (rows that already finished get the pad token) — a chat CLI streams from it.
///
/// # Shapes
/// `input_ids`, `attention_mask`: `[batch, prompt]` int64, `batch` and `prompt` ≥ 1.
pub fn generate(
    model: &dyn CausalLM,
    input_ids: &Tensor,
    attention_mask: Option<&Tensor>,
    cfg: &GenerationConfig,
    mut on_step: Option<OnStep<'_>>,
) -> Result<GenerateOutput, GenerationError> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let (batch, prompt_len) = match input_ids.size()[..] {
        [batch, len] if batch > 0 && len > 0 => (batch, len),
        _ => return Err(GenerationError::InputShape(input_ids.size())),
    };
    if let Some(m) = attention_mask {
        if m.size() != input_ids.size() {
            return Err(GenerationError::MaskShape {
                mask: m.size(),
                input: input_ids.size(),
            });
        }
    }
    let input_ids = input_ids.to_device(device);
    let mut mask = match attention_mask {
        Some(m) => m.to_device(device).to_kind(Kind::Int64),
        None => Tensor::ones([batch, prompt_len], (Kind::Int64, device)),
    };
    let has_padding = mask.min().int64_value(&[]) == 0;
    let budget = cfg.budget(prompt_len as usize) as i64;
    let pad = cfg
        .pad_token_id
        .or(cfg.eos_token_id.first().copied())
        .unwrap_or(0);
    let eos = Tensor::from_slice(&cfg.eos_token_id).to_device(device);

    let mut cache = model.new_cache();
    let mut sequences = input_ids.shallow_clone();
    let mut step_ids = input_ids.shallow_clone();
    let mut positions = position_ids_from_mask(&mask);
    let mut unfinished = Tensor::ones([batch], (Kind::Int64, device));
    let mut new_tokens = 0;

    while new_tokens < budget {
        let input = CausalLMInput {
            input_ids: &step_ids,
            attention_mask: if has_padding { Some(&mask) } else { None },
            position_ids: Some(&positions),
            seq_lens: None,
        };
        let hidden = model.forward_hidden(&input, Some(&mut cache), false);
        let last = hidden.narrow(1, hidden.size()[1] - 1, 1);
        // Scores in fp32 whatever the model dtype, as transformers does.
        let logits = model.lm_head(&last).squeeze_dim(1).to_kind(Kind::Float);
        let scores = process_logits(&logits, &sequences, cfg);
        let next = if cfg.do_sample {
            scores
                .softmax(-1, Kind::Float)
                .multinomial(1, false)
                .squeeze_dim(1)
        } else {
            scores.argmax(-1, false)
        };
        // Finished rows keep emitting the pad token.
        let next: Tensor = &next * &unfinished + (1 - &unfinished) * pad;
        sequences = Tensor::cat(&[&sequences, &next.unsqueeze(1)], 1);
        new_tokens += 1;
        if let Some(cb) = on_step.as_mut() {
            let ids: Vec<i64> = Vec::<i64>::try_from(&next).unwrap_or_default();
            cb(&ids);
        }
        if eos.numel() > 0 {
            let hit = next
                .unsqueeze(1)
                .eq_tensor(&eos.unsqueeze(0))
                .any_dim(1, false);
            unfinished *= hit.logical_not().to_kind(Kind::Int64);
        }
        if unfinished.max().int64_value(&[]) == 0 {
            break;
        }
        mask = Tensor::cat(
            &[&mask, &Tensor::ones([batch, 1], (Kind::Int64, device))],
            1,
        );
        positions = positions.narrow(1, positions.size()[1] - 1, 1) + 1;
        step_ids = next.unsqueeze(1);
    }
    Ok(GenerateOutput {
        sequences,
        new_tokens,
    })
}
