//! Preference data for DPO: TRL's formats (standard and conversational
//! `prompt` / `chosen` / `rejected`, and the implicit-prompt form with only
//! `chosen` / `rejected`) and LLaMA-Factory's sharegpt preference format
//! (`conversations` ending with a human turn, `chosen` and `rejected` as
//! `{from, value}`), detected from the first record and tokenized as TRL
//! 1.16's `DPOTrainer._prepare_dataset` does:
//!
//! - implicit prompts are split off with TRL's `extract_prompt` (the longest
//!   common prefix of the two completions: messages, or characters with a
//!   trailing space left to the completion);
//! - text completions get the eos token appended when they lack it; text is
//!   encoded with the tokenizer's special tokens, conversations through the
//!   chat template (the prompt with the generation prompt, prompt +
//!   completion without), and the completion starts where the tokenized
//!   prompt and prompt + completion diverge (`common_prefix_length`);
//! - truncation to `max_length` happens per sequence at collation
//!   ([`truncate_pair`]); pairs whose prompt alone fills `max_length` are
//!   dropped under `keep_start` ([`drop_pairs_without_completion`]).

use super::{DataError, Dataset, Record};
use crate::config::TruncationMode;
use crate::tokenizer::PreTrainedTokenizer;
use serde_json::{json, Value};

/// The layout of preference records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceFormat {
    /// `prompt` / `chosen` / `rejected` as message lists.
    Conversational,
    /// `prompt` / `chosen` / `rejected` as strings.
    Standard,
    /// `chosen` / `rejected` as whole conversations sharing the prompt turns.
    ImplicitConversational,
    /// `chosen` / `rejected` as strings sharing the prompt text.
    ImplicitStandard,
    /// LLaMA-Factory: `conversations: [{from, value}]` + `chosen` / `rejected: {from, value}`.
    Sharegpt,
    /// Already tokenized: `prompt_ids` / `chosen_ids` / `rejected_ids`.
    Tokenized,
}

impl PreferenceFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Conversational => "conversational preference (prompt/chosen/rejected messages)",
            Self::Standard => "standard preference (prompt/chosen/rejected text)",
            Self::ImplicitConversational => "implicit-prompt conversational preference",
            Self::ImplicitStandard => "implicit-prompt standard preference",
            Self::Sharegpt => "sharegpt preference (conversations + chosen/rejected)",
            Self::Tokenized => "tokenized preference (prompt_ids/chosen_ids/rejected_ids)",
        }
    }

    /// The format of a record, from its fields.
    pub fn detect(record: &Record) -> Result<Self, DataError> {
        let v = &record.value;
        let has = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
        if has("prompt_ids") {
            return Ok(Self::Tokenized);
        }
        if has("conversations") {
            return Ok(Self::Sharegpt);
        }
        if has("chosen") || has("rejected") {
            let conversational = v
                .get("prompt")
                .or_else(|| v.get("chosen"))
                .or_else(|| v.get("rejected"))
                .is_some_and(Value::is_array);
            return Ok(match (has("prompt"), conversational) {
                (true, true) => Self::Conversational,
                (true, false) => Self::Standard,
                (false, true) => Self::ImplicitConversational,
                (false, false) => Self::ImplicitStandard,
            });
        }
        let fields: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        Err(record_error(
            record,
            format!(
                "fields {fields:?} are not preference data: DPO needs \"chosen\" and \"rejected\" \
                 (with \"prompt\", or with sharegpt \"conversations\")"
            ),
        ))
    }
}

/// Whether a record is preference data (a chosen and a rejected
/// completion, or their token ids) rather than SFT data.
pub fn is_preference_record(record: &Record) -> bool {
    let has = |k: &str| record.value.get(k).is_some_and(|v| !v.is_null());
    (has("chosen") && has("rejected")) || has("chosen_ids")
}

/// One pair in the shape the tokenizer consumes.
#[derive(Debug, Clone, PartialEq)]
pub enum PreferenceExample {
    /// Message lists; `tools` is handed to the chat template.
    Conversational {
        prompt: Vec<Value>,
        chosen: Vec<Value>,
        rejected: Vec<Value>,
        tools: Option<Value>,
    },
    /// Text.
    Standard {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// Token ids, used as they are.
    Tokenized(TokenizedPair),
}

/// A tokenized pair (TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`), with
/// the reference log-probabilities once precomputed.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub prompt_ids: Vec<i64>,
    pub chosen_ids: Vec<i64>,
    pub rejected_ids: Vec<i64>,
    /// `precompute_ref_log_probs`: the reference model's summed completion
    /// log-probabilities (`ref_chosen_logps`, `ref_rejected_logps`).
    pub ref_logps: Option<(f64, f64)>,
}

impl TokenizedPair {
    /// The longer of prompt + chosen and prompt + rejected.
    pub fn max_len(&self) -> usize {
        self.prompt_ids.len() + self.chosen_ids.len().max(self.rejected_ids.len())
    }
}

fn record_error(record: &Record, message: String) -> DataError {
    DataError::Record {
        origin: record.origin.clone(),
        message,
    }
}

fn field<'a>(
    record: &'a Record,
    name: &str,
    format: PreferenceFormat,
) -> Result<&'a Value, DataError> {
    match record.value.get(name) {
        Some(v) if !v.is_null() => Ok(v),
        _ => Err(record_error(
            record,
            format!(
                "missing field \"{name}\" ({} records need it)",
                format.name()
            ),
        )),
    }
}

fn text(record: &Record, name: &str, format: PreferenceFormat) -> Result<String, DataError> {
    match field(record, name, format)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(record_error(
            record,
            format!("field \"{name}\" must be a string like the first record's, got {other}"),
        )),
    }
}

fn messages(
    record: &Record,
    name: &str,
    format: PreferenceFormat,
) -> Result<Vec<Value>, DataError> {
    let Value::Array(list) = field(record, name, format)? else {
        return Err(record_error(
            record,
            format!("field \"{name}\" must be a list of {{role, content}} messages like the first record's"),
        ));
    };
    for (i, m) in list.iter().enumerate() {
        if !(m.get("role").is_some_and(Value::is_string) && m.get("content").is_some()) {
            return Err(record_error(
                record,
                format!("field \"{name}\"[{i}] needs a string \"role\" and a \"content\""),
            ));
        }
    }
    Ok(list.clone())
}

/// A completion must be assistant turns: the model is trained to produce them.
fn check_assistant(record: &Record, name: &str, msgs: &[Value]) -> Result<(), DataError> {
    match msgs.first() {
        None => Err(record_error(record, format!("field \"{name}\" is empty"))),
        Some(m) if m["role"] != "assistant" => Err(record_error(
            record,
            format!(
                "field \"{name}\" must start with an assistant turn (the completion to prefer or avoid), \
                 got role {}",
                m["role"]
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// LLaMA-Factory's roles as chat roles.
fn sharegpt_role(from: &str) -> Option<&'static str> {
    match from {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "function_call" => Some("assistant"),
        "observation" => Some("observation"),
        "system" => Some("system"),
        _ => None,
    }
}

fn sharegpt_turn(record: &Record, name: &str, turn: &Value) -> Result<Value, DataError> {
    let from = turn.get("from").and_then(Value::as_str);
    let value = turn.get("value").and_then(Value::as_str);
    let (Some(from), Some(value)) = (from, value) else {
        return Err(record_error(
            record,
            format!(
                "field \"{name}\" needs {{\"from\": ..., \"value\": \"...\"}} turns, got {turn}"
            ),
        ));
    };
    let role = sharegpt_role(from).ok_or_else(|| {
        record_error(
            record,
            format!("field \"{name}\": unknown role {from:?} (expected human, gpt, observation, function_call or system)"),
        )
    })?;
    Ok(json!({"role": role, "content": value}))
}

/// The completion of a sharegpt preference record: one `{from: gpt, value}`
/// turn (or a list of such turns).
fn sharegpt_completion(record: &Record, name: &str) -> Result<Vec<Value>, DataError> {
    let v = field(record, name, PreferenceFormat::Sharegpt)?;
    let turns: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let msgs = turns
        .into_iter()
        .map(|t| sharegpt_turn(record, name, t))
        .collect::<Result<Vec<_>, _>>()?;
    check_assistant(record, name, &msgs)?;
    Ok(msgs)
}

/// TRL's `extract_prompt` on two sequences: the index where `chosen` and
/// `rejected` first differ (minus one when a space precedes it, so the
/// completion keeps its leading space). Mirrors the Python loop, whose
/// index stays on the last position when one sequence is a prefix of the other.
fn implicit_prompt_len<T: PartialEq>(chosen: &[T], rejected: &[T], space: Option<&T>) -> usize {
    let n = chosen.len().min(rejected.len());
    let mut idx = 0usize;
    for i in 0..n {
        idx = i;
        if chosen[i] != rejected[i] {
            if i > 0 && space.is_some_and(|s| &chosen[i - 1] == s) {
                idx -= 1;
            }
            break;
        }
    }
    idx
}

/// Converts a record of `format` to a [`PreferenceExample`]; bad records get
/// a one-line error naming the file, the record and the field.
pub fn to_preference_example(
    record: &Record,
    format: PreferenceFormat,
) -> Result<PreferenceExample, DataError> {
    use PreferenceFormat::*;
    let tools = match record.value.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(serde_json::from_str(s).map_err(|e| {
            record_error(record, format!("field \"tools\" is not valid JSON: {e}"))
        })?),
        Some(v) => Some(v.clone()),
    };
    let empty_prompt = || {
        record_error(
            record,
            "field \"prompt\" is empty: DPO needs a prompt the two completions answer".into(),
        )
    };
    let example = match format {
        Conversational => {
            let prompt = messages(record, "prompt", format)?;
            let chosen = messages(record, "chosen", format)?;
            let rejected = messages(record, "rejected", format)?;
            if prompt.is_empty() {
                return Err(empty_prompt());
            }
            check_assistant(record, "chosen", &chosen)?;
            check_assistant(record, "rejected", &rejected)?;
            PreferenceExample::Conversational {
                prompt,
                chosen,
                rejected,
                tools,
            }
        }
        Standard => {
            let prompt = text(record, "prompt", format)?;
            let chosen = text(record, "chosen", format)?;
            let rejected = text(record, "rejected", format)?;
            if prompt.is_empty() {
                return Err(empty_prompt());
            }
            PreferenceExample::Standard {
                prompt,
                chosen,
                rejected,
            }
        }
        ImplicitConversational => {
            let chosen = messages(record, "chosen", format)?;
            let rejected = messages(record, "rejected", format)?;
            let k = implicit_prompt_len(&chosen, &rejected, None);
            if k == 0 {
                return Err(record_error(
                    record,
                    "fields \"chosen\" and \"rejected\" share no leading turns, so there is no prompt: \
                     give a \"prompt\" field or start both with the same user turns"
                        .into(),
                ));
            }
            let (c, r) = (chosen[k..].to_vec(), rejected[k..].to_vec());
            check_assistant(record, "chosen", &c)?;
            check_assistant(record, "rejected", &r)?;
            PreferenceExample::Conversational {
                prompt: chosen[..k].to_vec(),
                chosen: c,
                rejected: r,
                tools,
            }
        }
        ImplicitStandard => {
            let chosen: Vec<char> = text(record, "chosen", format)?.chars().collect();
            let rejected: Vec<char> = text(record, "rejected", format)?.chars().collect();
            let k = implicit_prompt_len(&chosen, &rejected, Some(&' '));
            if k == 0 {
                return Err(record_error(
                    record,
                    "fields \"chosen\" and \"rejected\" share no leading text, so there is no prompt: \
                     give a \"prompt\" field"
                        .into(),
                ));
            }
            PreferenceExample::Standard {
                prompt: chosen[..k].iter().collect(),
                chosen: chosen[k..].iter().collect(),
                rejected: rejected[k..].iter().collect(),
            }
        }
        Sharegpt => {
            let Value::Array(turns) = field(record, "conversations", format)? else {
                return Err(record_error(
                    record,
                    "field \"conversations\" must be a list of {from, value} turns".into(),
                ));
            };
            let mut prompt = Vec::with_capacity(turns.len() + 1);
            if let Some(system) = record.value.get("system").and_then(Value::as_str) {
                if !system.is_empty() {
                    prompt.push(json!({"role": "system", "content": system}));
                }
            }
            for t in turns {
                prompt.push(sharegpt_turn(record, "conversations", t)?);
            }
            if turns.is_empty() {
                return Err(record_error(
                    record,
                    "field \"conversations\" is empty: DPO needs a prompt the two completions answer".into(),
                ));
            }
            let chosen = sharegpt_completion(record, "chosen")?;
            let rejected = sharegpt_completion(record, "rejected")?;
            PreferenceExample::Conversational {
                prompt,
                chosen,
                rejected,
                tools,
            }
        }
        Tokenized => {
            let ids = |name: &str| -> Result<Vec<i64>, DataError> {
                serde_json::from_value(field(record, name, format)?.clone()).map_err(|_| {
                    record_error(
                        record,
                        format!("field \"{name}\" must be a list of integers"),
                    )
                })
            };
            let pair = TokenizedPair {
                prompt_ids: ids("prompt_ids")?,
                chosen_ids: ids("chosen_ids")?,
                rejected_ids: ids("rejected_ids")?,
                ref_logps: None,
            };
            if pair.prompt_ids.is_empty() {
                return Err(record_error(record, "field \"prompt_ids\" is empty".into()));
            }
            PreferenceExample::Tokenized(pair)
        }
    };
    Ok(example)
}

/// Tokens both sequences start with (TRL's `common_prefix_length`).
fn common_prefix_length(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes one pair as TRL's `tokenize_fn`.
pub fn tokenize_pair(
    tokenizer: &PreTrainedTokenizer,
    example: &PreferenceExample,
) -> Result<TokenizedPair, crate::tokenizer::TokenizerError> {
    let (prompt_ids, chosen_full, rejected_full) = match example {
        PreferenceExample::Tokenized(pair) => return Ok(pair.clone()),
        PreferenceExample::Conversational {
            prompt,
            chosen,
            rejected,
            tools,
        } => {
            let tools = tools.as_ref();
            let with = |c: &[Value]| -> Vec<Value> { prompt.iter().chain(c).cloned().collect() };
            (
                tokenizer.apply_chat_template_ids(prompt, tools, true)?,
                tokenizer.apply_chat_template_ids(&with(chosen), tools, false)?,
                tokenizer.apply_chat_template_ids(&with(rejected), tools, false)?,
            )
        }
        PreferenceExample::Standard {
            prompt,
            chosen,
            rejected,
        } => {
            // TRL adds the eos token to text completions that lack it.
            let eos = tokenizer.eos_token().unwrap_or("").to_string();
            let with_eos = |s: &str| {
                if eos.is_empty() || s.ends_with(&eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                tokenizer.encode(prompt, true)?,
                tokenizer.encode(&format!("{prompt}{}", with_eos(chosen)), true)?,
                tokenizer.encode(&format!("{prompt}{}", with_eos(rejected)), true)?,
            )
        }
    };
    let prompt_len = common_prefix_length(&prompt_ids, &chosen_full)
        .min(common_prefix_length(&prompt_ids, &rejected_full));
    Ok(TokenizedPair {
        prompt_ids: prompt_ids[..prompt_len].to_vec(),
        chosen_ids: chosen_full[prompt_len..].to_vec(),
        rejected_ids: rejected_full[prompt_len..].to_vec(),
        ref_logps: None,
    })
}

/// Detects the format from the first record and tokenizes every record.
pub fn tokenize_preference_dataset(
    dataset: &Dataset,
    tokenizer: &PreTrainedTokenizer,
) -> Result<(PreferenceFormat, Vec<TokenizedPair>), DataError> {
    let first = dataset
        .records
        .first()
        .ok_or_else(|| DataError::Invalid("the preference dataset is empty".into()))?;
    let format = PreferenceFormat::detect(first)?;
    let mut out = Vec::with_capacity(dataset.len());
    for record in &dataset.records {
        let example = to_preference_example(record, format)?;
        let pair = tokenize_pair(tokenizer, &example).map_err(|error| DataError::Tokenizer {
            origin: record.origin.clone(),
            error,
        })?;
        out.push(pair);
    }
    Ok((format, out))
}

/// TRL drops pairs whose prompt alone fills `max_length` under `keep_start`
/// (truncation would leave no completion token). Returns the kept pairs and
/// how many were dropped.
pub fn drop_pairs_without_completion(
    pairs: Vec<TokenizedPair>,
    max_length: Option<usize>,
    mode: TruncationMode,
) -> (Vec<TokenizedPair>, usize) {
    let Some(max) = max_length.filter(|_| mode == TruncationMode::KeepStart) else {
        return (pairs, 0);
    };
    let before = pairs.len();
    let kept: Vec<TokenizedPair> = pairs
        .into_iter()
        .filter(|p| p.prompt_ids.len() < max)
        .collect();
    let dropped = before - kept.len();
    (kept, dropped)
}

/// `prompt + completion` and its completion mask, cut to `max_length` as
/// TRL's `DataCollatorForPreference` does (per sequence, before padding).
pub fn truncate_pair(
    prompt: &[i64],
    completion: &[i64],
    max_length: Option<usize>,
    mode: TruncationMode,
) -> (Vec<i64>, Vec<i64>) {
    let mut ids: Vec<i64> = prompt.iter().chain(completion).copied().collect();
    let mut mask: Vec<i64> = std::iter::repeat_n(0, prompt.len())
        .chain(std::iter::repeat_n(1, completion.len()))
        .collect();
    if let Some(max) = max_length {
        if ids.len() > max {
            match mode {
                TruncationMode::KeepStart => {
                    ids.truncate(max);
                    mask.truncate(max);
                }
                TruncationMode::KeepEnd => {
                    let cut = ids.len() - max;
                    ids.drain(..cut);
                    mask.drain(..cut);
                }
            }
        }
    }
    (ids, mask)
}

/// A stable fingerprint of tokenized pairs (a resumed run must train on the same rows).
pub fn fingerprint_pairs(pairs: &[TokenizedPair]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut put = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    put(pairs.len() as u64);
    for p in pairs {
        for ids in [&p.prompt_ids, &p.chosen_ids, &p.rejected_ids] {
            put(ids.len() as u64);
            ids.iter().for_each(|&t| put(t as u64));
        }
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Origin;

    fn rec(v: Value) -> Record {
        Record {
            value: v,
            origin: Origin {
                file: "pairs.json".into(),
                index: 3,
                line: None,
            },
        }
    }

    #[test]
    fn detects_each_layout() {
        let cases = [
            (
                json!({"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}),
                PreferenceFormat::Conversational,
            ),
            (
                json!({"prompt": "q", "chosen": "a", "rejected": "b"}),
                PreferenceFormat::Standard,
            ),
            (
                json!({"chosen": [], "rejected": []}),
                PreferenceFormat::ImplicitConversational,
            ),
            (
                json!({"chosen": "q a", "rejected": "q b"}),
                PreferenceFormat::ImplicitStandard,
            ),
            (
                json!({"conversations": [], "chosen": {}, "rejected": {}}),
                PreferenceFormat::Sharegpt,
            ),
            (
                json!({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}),
                PreferenceFormat::Tokenized,
            ),
        ];
        for (v, want) in cases {
            assert_eq!(PreferenceFormat::detect(&rec(v)).unwrap(), want);
        }
        let e = PreferenceFormat::detect(&rec(json!({"instruction": "x", "output": "y"})))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("pairs.json record 3:") && e.contains("chosen"),
            "{e}"
        );
    }

    #[test]
    fn implicit_prompt_follows_trl_extract_prompt() {
        // TRL: the space before the first difference goes to the completions.
        let ex = to_preference_example(
            &rec(json!({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"})),
            PreferenceFormat::ImplicitStandard,
        )
        .unwrap();
        assert_eq!(
            ex,
            PreferenceExample::Standard {
                prompt: "Q: sky? A:".into(),
                chosen: " blue".into(),
                rejected: " green".into()
            }
        );
    }

    #[test]
    fn bad_records_name_file_record_and_field() {
        let e = to_preference_example(
            &rec(json!({"prompt": "q", "chosen": "a"})),
            PreferenceFormat::Standard,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("pairs.json record 3:") && e.contains("\"rejected\""),
            "{e}"
        );
        let e = to_preference_example(
            &rec(json!({"prompt": [{"role": "user", "content": "q"}],
                        "chosen": [{"role": "user", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}]})),
            PreferenceFormat::Conversational,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"chosen\"") && e.contains("assistant"), "{e}");
        let e = to_preference_example(
            &rec(json!({"prompt": "", "chosen": "a", "rejected": "b"})),
            PreferenceFormat::Standard,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"prompt\" is empty"), "{e}");
        let e = to_preference_example(
            &rec(json!({"conversations": [{"from": "human", "value": "q"}],
                        "chosen": {"from": "human", "value": "a"},
                        "rejected": {"from": "gpt", "value": "b"}})),
            PreferenceFormat::Sharegpt,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"chosen\"") && e.contains("assistant"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn truncation_is_per_sequence_like_trl_collator() {
        let (ids, mask) = truncate_pair(&[1, 2, 3], &[4, 5], Some(4), TruncationMode::KeepStart);
        assert_eq!((ids, mask), (vec![1, 2, 3, 4], vec![0, 0, 0, 1]));
        let (ids, mask) = truncate_pair(&[1, 2, 3], &[4, 5], Some(3), TruncationMode::KeepEnd);
        assert_eq!((ids, mask), (vec![3, 4, 5], vec![0, 1, 1]));
    }
}
