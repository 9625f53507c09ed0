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
use crate::chat_template::ChatTemplate;
use crate::config::{ConfigError, SFTConfig};
use crate::tokenizer::{PreTrainedTokenizer, TokenizerError};
use serde_json::Value;
use std::path::Path;

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

    /// Number of labels the loss actually sees: the first token of each sequence
    /// is never predicted (the causal shift, and TRL's padding-free collator masks it).
    pub fn trainable_tokens(&self) -> usize {
        let whole = [self.input_ids.len()];
        let lengths = self.seq_lengths.as_deref().unwrap_or(&whole);
        let mut start = 0;
        let mut n = 0;
        for &len in lengths {
            let end = (start + len).min(self.labels.len());
            if start + 1 < end {
                n += self.labels[start + 1..end]
                    .iter()
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count();
            }
            start = end;
        }
        n
    }
}

/// Leaves out the examples the loss would never see — typically prompt-completion
/// or assistant-only records whose prompt is longer than `max_length`, so that
/// truncation cut every token with loss — and says how many. TRL 1.16 keeps
/// them and trains on nothing (loss 0, gradient 0) when a whole batch is such;
/// see docs/PARITY.md. `split` names the dataset in messages ("training").
pub fn drop_examples_without_loss(
    examples: Vec<TokenizedExample>,
    split: &str,
    max_length: Option<usize>,
) -> Result<Vec<TokenizedExample>, super::DataError> {
    let total = examples.len();
    let (kept, dropped): (Vec<_>, Vec<_>) =
        examples.into_iter().partition(|e| e.trainable_tokens() > 0);
    if dropped.is_empty() {
        return Ok(kept);
    }
    let cut = dropped.iter().filter(|e| e.truncated_tokens > 0).count();
    let limit = max_length.map_or("none".to_string(), |m| m.to_string());
    let why = if cut == dropped.len() {
        format!("truncation to max_length {limit} cut every token that carries loss")
    } else {
        format!(
            "{cut} lost every token that carries loss to truncation (max_length {limit}), \
             {} had none to begin with",
            dropped.len() - cut
        )
    };
    if kept.is_empty() {
        return Err(super::DataError::Invalid(format!(
            "none of the {total} {split} examples has a token to learn from: {why}; \
             raise --max_length (or use --truncation_mode keep_end)"
        )));
    }
    log::warn!(
        "dropped {} of {total} {split} examples with no token to learn from: {why}",
        dropped.len()
    );
    Ok(kept)
}

/// Applies the tokenizer settings of an [`SFTConfig`] as TRL 1.16's
/// `SFTTrainer.__init__` does, in its order:
///
/// - `eos_token` becomes the tokenizer's eos token (the one appended to texts and
///   saved with the tokenizer); it must be in the vocabulary;
/// - `chat_template_path` replaces the chat template: a `.jinja`/`.j2` file is the
///   template itself; anything else is a tokenizer directory whose template is
///   taken along with its eos token (TRL's `clone_chat_template`). TRL would also
///   add the source's extra tokens and resize the embeddings; that is refused
///   here (see docs/PARITY.md) rather than done halfway;
/// - `pad_token` must be in the vocabulary (it is only used by the collator, see
///   [`collator_pad_token_id`]).
///
/// Idempotent, so `glm4 preview` and the trainer may both call it.
pub fn apply_sft_tokenizer_args(
    tokenizer: &mut PreTrainedTokenizer,
    args: &SFTConfig,
) -> Result<(), ConfigError> {
    if let Some(eos) = &args.eos_token {
        tokenizer.set_eos_token(eos).map_err(|_| {
            ConfigError::invalid(
                "eos_token",
                format!(
                    "{eos:?} is not in the vocabulary of the tokenizer in {}; use a token it has (its eos token is {:?})",
                    tokenizer.name_or_path().display(),
                    tokenizer.eos_token().unwrap_or("unset")
                ),
            )
        })?;
    }
    if let Some(path) = &args.chat_template_path {
        apply_chat_template_path(tokenizer, Path::new(path))?;
    }
    if let Some(pad) = &args.pad_token {
        if tokenizer.token_to_id(pad).is_none() {
            return Err(ConfigError::invalid(
                "pad_token",
                format!(
                    "{pad:?} is not in the vocabulary of the tokenizer in {}; use a token it has (e.g. its eos token {:?}) or leave pad_token unset",
                    tokenizer.name_or_path().display(),
                    tokenizer.eos_token().unwrap_or("unset")
                ),
            ));
        }
    }
    Ok(())
}

fn apply_chat_template_path(
    tokenizer: &mut PreTrainedTokenizer,
    path: &Path,
) -> Result<(), ConfigError> {
    let field = "chat_template_path";
    let shown = path.display();
    let is_jinja = path.extension().is_some_and(|e| e == "jinja" || e == "j2");
    if path.is_file() && is_jinja {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::invalid(field, format!("{shown}: {e}")))?;
        // Compiled now so that a broken template is blamed on its file, not on a record.
        ChatTemplate::new(source.clone())
            .map_err(|e| ConfigError::invalid(field, format!("{shown}: {e}")))?;
        tokenizer.set_chat_template(source);
        return Ok(());
    }
    if !path.exists() {
        return Err(ConfigError::invalid(
            field,
            format!("{shown}: no such file or directory (give a .jinja/.j2 template file or a tokenizer directory)"),
        ));
    }
    if path.is_file() {
        return Err(ConfigError::invalid(
            field,
            format!("{shown} is a file but not a .jinja/.j2 template; TRL reads templates from .jinja/.j2 files or from tokenizer directories"),
        ));
    }
    let source = PreTrainedTokenizer::from_pretrained(path).map_err(|e| {
        ConfigError::invalid(field, format!("{shown} is not a tokenizer directory: {e}"))
    })?;
    let template = source.chat_template().ok_or_else(|| {
        ConfigError::invalid(
            field,
            format!("the tokenizer in {shown} has no (default) chat template to take"),
        )
    })?;
    ChatTemplate::new(template.to_string())
        .map_err(|e| ConfigError::invalid(field, format!("{shown}: {e}")))?;
    let mut missing: Vec<String> = source
        .backend()
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .filter(|t| tokenizer.token_to_id(t).is_none())
        .collect();
    missing.sort();
    if !missing.is_empty() {
        let shown_tokens: Vec<&String> = missing.iter().take(5).collect();
        return Err(ConfigError::unsupported(
            field,
            format!(
                "the tokenizer in {shown} has {} token(s) this model's vocabulary lacks ({shown_tokens:?}{}); \
                 adding them would resize the embeddings, which is not supported — use a template whose tokens the model has, or a .jinja file",
                missing.len(),
                if missing.len() > 5 { ", …" } else { "" }
            ),
        ));
    }
    let template = template.to_string();
    if let Some(eos) = source.eos_token().map(str::to_string) {
        tokenizer.set_eos_token(&eos).map_err(|_| {
            ConfigError::invalid(
                field,
                format!("the eos token {eos:?} of the tokenizer in {shown} is not in this model's vocabulary"),
            )
        })?;
    }
    tokenizer.set_chat_template(template);
    Ok(())
}

/// The id the collator pads with, by TRL's rule: `pad_token`, else the
/// tokenizer's pad token, else its eos token.
pub fn collator_pad_token_id(tokenizer: &PreTrainedTokenizer, args: &SFTConfig) -> Option<i64> {
    args.pad_token
        .as_deref()
        .and_then(|t| tokenizer.token_to_id(t))
        .or(tokenizer.pad_token_id())
        .or(tokenizer.eos_token_id())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn example(
        labels: &[i64],
        seq_lengths: Option<Vec<usize>>,
        truncated: usize,
    ) -> TokenizedExample {
        TokenizedExample {
            text: String::new(),
            input_ids: vec![1; labels.len()],
            labels: labels.to_vec(),
            truncated_tokens: truncated,
            seq_lengths,
        }
    }

    #[test]
    fn the_first_token_of_each_sequence_is_never_learned() {
        let x = IGNORE_INDEX;
        assert_eq!(example(&[5, x, x], None, 0).trainable_tokens(), 0);
        assert_eq!(example(&[5, 6, x], None, 0).trainable_tokens(), 1);
        // Packed: [5, 6 | 7, x]: 6 is learned, 7 starts a sequence.
        assert_eq!(
            example(&[5, 6, 7, x], Some(vec![2, 2]), 0).trainable_tokens(),
            1
        );
        assert_eq!(example(&[5], None, 0).trainable_tokens(), 0);
    }

    #[test]
    fn examples_without_loss_are_dropped_or_refused() {
        let x = IGNORE_INDEX;
        let kept = drop_examples_without_loss(
            vec![example(&[x, x], None, 3), example(&[x, 4], None, 0)],
            "training",
            Some(2),
        )
        .unwrap();
        assert_eq!(kept.len(), 1);
        let err = drop_examples_without_loss(vec![example(&[x, x], None, 3)], "training", Some(2))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("none of the 1 training examples") && err.contains("max_length 2"),
            "{err}"
        );
    }

    #[test]
    fn pad_token_setting_picks_the_collator_pad_id() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights/tiny-glm");
        let mut tok = PreTrainedTokenizer::from_pretrained(dir).unwrap();
        let mut args = SFTConfig::default();
        assert_eq!(collator_pad_token_id(&tok, &args), tok.pad_token_id());
        args.pad_token = Some("<|user|>".into());
        apply_sft_tokenizer_args(&mut tok, &args).unwrap();
        assert_eq!(
            collator_pad_token_id(&tok, &args),
            tok.token_to_id("<|user|>")
        );
        // TRL leaves the tokenizer's own pad token (what is saved) alone.
        assert_eq!(tok.pad_token(), Some("<|endoftext|>"));
        args.pad_token = Some("bogus".into());
        let err = apply_sft_tokenizer_args(&mut tok, &args).unwrap_err();
        assert_eq!(err.field(), "pad_token");
    }
}
