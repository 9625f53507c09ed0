//! From an [`Example`] to token ids and labels, by TRL's rules for SFT:
//!
//! - conversations are rendered with the chat template (as the tutorial's
//!   `formatting_func` does) and then treated as text;
//! - text gets the eos token appended when it does not already end with it,
//!   and is encoded with the tokenizer's special tokens (TRL tokenizes text with
//!   `add_special_tokens=True`) — except when the text already starts with them,
//!   as a chat-template rendering does (`[gMASK]<sop>…`): TRL 1.16 would then
//!   prefix GLM-4 sequences with `[gMASK]<sop>` twice, which we deliberately avoid
//!   so training sees exactly what inference sees;
//! - labels are the input ids (loss on every token) unless a completion-only or
//!   assistant-only mask applies; positions without loss hold -100;
//! - sequences longer than `max_length` are truncated (`keep_start` or `keep_end`).

use super::Example;
use crate::tokenizer::{PreTrainedTokenizer, TokenizerError};
use serde_json::Value;

/// Label value of positions that take no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

pub use crate::config::TruncationMode;

/// The SFTConfig fields that shape tokenization.
#[derive(Debug, Clone, Default)]
pub struct TokenizeOptions {
    /// Longest sequence kept (`max_length`, the tutorial's `max_seq_length`); `None` = no limit.
    pub max_length: Option<usize>,
    pub truncation_mode: TruncationMode,
    /// Loss on the completion only for prompt/completion data (`None` = TRL's default: yes).
    pub completion_only_loss: Option<bool>,
    /// Loss on assistant turns only (and the token that ends each of them).
    pub assistant_only_loss: bool,
}

/// A tokenized training example.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    /// The text that was encoded (after the template and the eos token).
    pub text: String,
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] where no loss is taken.
    pub labels: Vec<i64>,
    /// Tokens cut by truncation (0 when the example fit).
    pub truncated_tokens: usize,
    /// A packed example (TRL's `seq_lengths` column): the lengths of the
    /// sequences laid back to back in `input_ids`. `None` = one sequence.
    pub seq_lengths: Option<Vec<usize>>,
}

impl TokenizedExample {
    /// Number of positions that take loss before the causal shift.
    pub fn loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Renders, encodes and masks one example.
pub fn tokenize_example(
    tokenizer: &PreTrainedTokenizer,
    example: &Example,
    opts: &TokenizeOptions,
) -> Result<TokenizedExample, TokenizerError> {
    let eos = tokenizer.eos_token().unwrap_or_default().to_string();
    let with_eos = |mut text: String| {
        if !eos.is_empty() && !text.ends_with(&eos) {
            text.push_str(&eos);
        }
        text
    };
    let (text, input_ids, loss_mask) = match example {
        Example::Tokenized { input_ids, labels } => {
            let labels = labels.clone().unwrap_or_else(|| input_ids.clone());
            let mask = labels.iter().map(|&l| l != IGNORE_INDEX).collect();
            (String::new(), input_ids.clone(), Some(mask))
        }
        Example::Text(text) => {
            let text = with_eos(text.clone());
            let ids = encode_once(tokenizer, &text)?;
            (text, ids, None)
        }
        Example::Conversation { messages } => {
            let text = with_eos(tokenizer.apply_chat_template(messages, None, false)?);
            let ids = encode_once(tokenizer, &text)?;
            let mask = if opts.assistant_only_loss {
                Some(assistant_mask(tokenizer, messages, &ids)?)
            } else {
                None
            };
            (text, ids, mask)
        }
        Example::PromptCompletion { prompt, completion } => {
            let text = with_eos(format!("{prompt}{completion}"));
            let ids = encode_once(tokenizer, &text)?;
            let mask = if opts.completion_only_loss.unwrap_or(true) {
                let prompt_len = encode_once(tokenizer, prompt)?.len().min(ids.len());
                Some((0..ids.len()).map(|i| i >= prompt_len).collect())
            } else {
                None
            };
            (text, ids, mask)
        }
    };
    let mut labels: Vec<i64> = match &loss_mask {
        Some(mask) => input_ids
            .iter()
            .zip(mask)
            .map(|(&id, &keep)| if keep { id } else { IGNORE_INDEX })
            .collect(),
        None => input_ids.clone(),
    };
    let mut input_ids = input_ids;
    let mut truncated_tokens = 0;
    if let Some(max) = opts.max_length {
        if input_ids.len() > max {
            truncated_tokens = input_ids.len() - max;
            match opts.truncation_mode {
                TruncationMode::KeepStart => {
                    input_ids.truncate(max);
                    labels.truncate(max);
                }
                TruncationMode::KeepEnd => {
                    input_ids.drain(..truncated_tokens);
                    labels.drain(..truncated_tokens);
                }
            }
        }
    }
    Ok(TokenizedExample {
        text,
        input_ids,
        labels,
        truncated_tokens,
        seq_lengths: None,
    })
}

/// Encodes with the tokenizer's special tokens unless the text already starts
/// with them (see the module docs).
pub fn encode_once(
    tokenizer: &PreTrainedTokenizer,
    text: &str,
) -> Result<Vec<i64>, TokenizerError> {
    let plain = tokenizer.encode(text, false)?;
    let with_special = tokenizer.encode(text, true)?;
    if with_special.len() > plain.len() && with_special.ends_with(&plain) {
        let prefix = &with_special[..with_special.len() - plain.len()];
        if plain.starts_with(prefix) {
            return Ok(plain);
        }
    }
    Ok(with_special)
}

/// Marks the tokens of every assistant turn plus the token right after it (the
/// role token of the next turn, or eos), which is what the model must learn to
/// emit to stop. GLM's template has no `{% generation %}` markers, so turn
/// boundaries come from rendering growing prefixes of the conversation: the
/// prompt up to `<|assistant|>` and the conversation through that turn.
fn assistant_mask(
    tokenizer: &PreTrainedTokenizer,
    messages: &[Value],
    ids: &[i64],
) -> Result<Vec<bool>, TokenizerError> {
    let mut mask = vec![false; ids.len()];
    let is_prefix = |p: &[i64]| p.len() <= ids.len() && ids[..p.len()] == *p;
    for (i, m) in messages.iter().enumerate() {
        if m["role"] != "assistant" || i == 0 {
            continue;
        }
        let prompt = tokenizer.apply_chat_template_ids(&messages[..i], None, true)?;
        let through = tokenizer.apply_chat_template_ids(&messages[..=i], None, false)?;
        // An assistant turn the template does not render (empty content) leaves no span.
        if !is_prefix(&prompt) || !is_prefix(&through) || through.len() <= prompt.len() {
            continue;
        }
        let end = (through.len() + 1).min(ids.len());
        for slot in &mut mask[prompt.len()..end] {
            *slot = true;
        }
    }
    Ok(mask)
}
