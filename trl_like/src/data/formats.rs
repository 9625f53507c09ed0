//! Record formats and their conversion to what the model is trained on.
//!
//! - `alpaca`: `instruction`, optional `input`, `output` (+ optional `system`,
//!   `history` as `[[question, answer], …]`) — the tutorial's `formatting_func`.
//! - `sharegpt`: `conversations` with `from` human / gpt / function_call /
//!   observation and `tools` as a JSON string — the tutorial's toolcall `trans_data`.
//! - `messages`: `messages` with `role` / `content` (+ optional top-level `tools`).
//! - `text`: a ready `text` field. `prompt_completion`: `prompt` + `completion`.

use super::{DataError, Record};
use crate::config::UnknownChoice;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DatasetFormat {
    type Err = UnknownChoice;
    /// One of [`CHOICES`](Self::CHOICES), or `tokenized`.
    fn from_str(s: &str) -> Result<Self, UnknownChoice> {
        if s == "tokenized" {
            return Ok(Self::Tokenized);
        }
        Self::CHOICES
            .iter()
            .position(|c| *c == s)
            .map(|i| ALL[i])
            .ok_or_else(|| UnknownChoice::new(s, Self::CHOICES))
    }
}

/// The variants in the order of [`DatasetFormat::CHOICES`].
const ALL: [DatasetFormat; 6] = [
    DatasetFormat::Auto,
    DatasetFormat::Alpaca,
    DatasetFormat::Sharegpt,
    DatasetFormat::Messages,
    DatasetFormat::Text,
    DatasetFormat::PromptCompletion,
];

/// The layout of the records in the data files (`--dataset_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetFormat {
    /// Detect from the first record's keys.
    Auto,
    /// `instruction` / `input` / `output` (optionally `system`, `history`).
    Alpaca,
    /// `conversations: [{from, value}]` (optionally `tools`, `system`).
    Sharegpt,
    /// `messages: [{role, content}]`, the chat-template format.
    Messages,
    /// A plain text column (`dataset_text_field`).
    Text,
    /// `prompt` / `completion`.
    PromptCompletion,
    /// Records that carry `input_ids` (and optionally `labels`); detected, not a choice.
    Tokenized,
}

impl DatasetFormat {
    /// The formats a user can ask for (`--dataset_format`, YAML).
    pub const CHOICES: &'static [&'static str] = &[
        "auto",
        "alpaca",
        "sharegpt",
        "messages",
        "text",
        "prompt_completion",
    ];

    /// The name used in YAML files and on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Alpaca => "alpaca",
            Self::Sharegpt => "sharegpt",
            Self::Messages => "messages",
            Self::Text => "text",
            Self::PromptCompletion => "prompt_completion",
            Self::Tokenized => "tokenized",
        }
    }

    /// Same as [`as_str`](Self::as_str).
    pub fn name(self) -> &'static str {
        self.as_str()
    }

    /// Picks the format from the fields of a record.
    pub fn detect(record: &Value) -> Option<Self> {
        let has = |k: &str| record.get(k).is_some();
        if has("input_ids") {
            Some(Self::Tokenized)
        } else if has("conversations") {
            Some(Self::Sharegpt)
        } else if has("messages") {
            Some(Self::Messages)
        } else if has("instruction") && has("output") {
            Some(Self::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(Self::PromptCompletion)
        } else if has("text") {
            Some(Self::Text)
        } else {
            None
        }
    }

    /// Resolves `auto` from the first record.
    pub fn resolve(self, first: &Record) -> Result<Self, DataError> {
        if self != Self::Auto {
            return Ok(self);
        }
        Self::detect(&first.value).ok_or_else(|| DataError::Record {
            origin: first.origin.clone(),
            message: undetected_message(&first.value),
        })
    }
}

/// The fields each format needs, and fields that only it uses (evidence for
/// it when a record lacks a required one).
const FORMAT_FIELDS: &[(DatasetFormat, &[&str], &[&str])] = &[
    (
        DatasetFormat::Alpaca,
        &["instruction", "output"],
        &["input", "history", "system"],
    ),
    (
        DatasetFormat::PromptCompletion,
        &["prompt", "completion"],
        &[],
    ),
    (DatasetFormat::Sharegpt, &["conversations"], &["tools"]),
    (DatasetFormat::Messages, &["messages"], &[]),
    (DatasetFormat::Text, &["text"], &[]),
    (DatasetFormat::Tokenized, &["input_ids"], &["labels"]),
];

/// Why no format fits a record: the closest format and the fields it lacks,
/// or, when nothing is close, what each format needs.
fn undetected_message(record: &Value) -> String {
    let fields: Vec<&str> = record
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let has = |k: &&str| fields.contains(k);
    let closest = FORMAT_FIELDS
        .iter()
        .map(|(format, required, extra)| {
            let score = required.iter().filter(|k| has(k)).count() * 2
                + extra.iter().filter(|k| has(k)).count();
            (score, *format, *required)
        })
        .filter(|(score, _, _)| *score > 0)
        .max_by_key(|(score, _, _)| *score);
    match closest {
        Some((_, format, required)) => {
            let missing: Vec<String> = required
                .iter()
                .filter(|k| !has(k))
                .map(|k| format!("\"{k}\""))
                .collect();
            format!(
                "fields {fields:?} are closest to the {} format, which also needs {}; add it to the records (or set --dataset_format)",
                format.name(),
                missing.join(" and ")
            )
        }
        None => {
            let known: Vec<String> = FORMAT_FIELDS
                .iter()
                .map(|(format, required, _)| {
                    format!("{} ({})", format.name(), required.join(" + "))
                })
                .collect();
            format!(
                "cannot tell the dataset format from its fields {fields:?}: none of {} fits; rename the fields or set --dataset_format",
                known.join(", ")
            )
        }
    }
}

/// A record in the shape the tokenizer consumes.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Chat messages (rendered with the chat template; `tools` may ride on a message).
    Conversation { messages: Vec<Value> },
    /// Ready text (TRL's `dataset_text_field`).
    Text(String),
    /// Prompt and completion texts (loss on the completion by default).
    PromptCompletion { prompt: String, completion: String },
    /// Already tokenized (`input_ids`, optional `labels` with -100 where no loss
    /// is taken): used as is, as TRL does with pre-tokenized datasets.
    Tokenized {
        input_ids: Vec<i64>,
        labels: Option<Vec<i64>>,
    },
}

fn field<'a>(record: &'a Record, name: &str) -> Result<&'a Value, DataError> {
    record.value.get(name).ok_or_else(|| DataError::Record {
        origin: record.origin.clone(),
        message: format!("missing field \"{name}\""),
    })
}

fn string_field(record: &Record, name: &str) -> Result<String, DataError> {
    match field(record, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(DataError::Record {
            origin: record.origin.clone(),
            message: format!("field \"{name}\" must be a string, got {}", kind(other)),
        }),
    }
}

fn optional_string(record: &Record, name: &str) -> Result<Option<String>, DataError> {
    match record.value.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string_field(record, name).map(Some),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Converts a raw record of `format` (not `Auto`) to an [`Example`].
pub fn to_example(
    record: &Record,
    format: DatasetFormat,
    text_field: &str,
) -> Result<Example, DataError> {
    let bad = |message: String| DataError::Record {
        origin: record.origin.clone(),
        message,
    };
    match format {
        DatasetFormat::Auto => {
            let resolved = DatasetFormat::Auto.resolve(record)?;
            to_example(record, resolved, text_field)
        }
        DatasetFormat::Alpaca => Ok(Example::Conversation {
            messages: alpaca_messages(record)?,
        }),
        DatasetFormat::Sharegpt => Ok(Example::Conversation {
            messages: sharegpt_messages(record)?,
        }),
        DatasetFormat::Messages => {
            let Value::Array(list) = field(record, "messages")? else {
                return Err(bad(
                    "field \"messages\" must be a list of {role, content} objects".into(),
                ));
            };
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let ok = m.get("role").is_some_and(Value::is_string) && m.get("content").is_some();
                if !ok {
                    return Err(bad(format!(
                        "messages[{i}] needs a string \"role\" and a \"content\""
                    )));
                }
                messages.push(m.clone());
            }
            if messages.is_empty() {
                return Err(bad("field \"messages\" is empty".into()));
            }
            // GLM's template reads tools from a message: attach top-level tools to a system message.
            if let Some(tools) = record.value.get("tools").filter(|t| !t.is_null()) {
                let tools = parse_tools(record, tools)?;
                match messages.first_mut().filter(|m| m["role"] == "system") {
                    Some(Value::Object(system)) => {
                        system.insert("tools".into(), tools);
                    }
                    _ => {
                        messages.insert(0, json!({"role": "system", "content": "", "tools": tools}))
                    }
                }
            }
            Ok(Example::Conversation { messages })
        }
        DatasetFormat::Text => Ok(Example::Text(string_field(record, text_field)?)),
        DatasetFormat::Tokenized => {
            let ids = |name: &str| -> Result<Option<Vec<i64>>, DataError> {
                match record.value.get(name) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => serde_json::from_value(v.clone())
                        .map(Some)
                        .map_err(|_| bad(format!("field \"{name}\" must be a list of integers"))),
                }
            };
            let input_ids =
                ids("input_ids")?.ok_or_else(|| bad("missing field \"input_ids\"".into()))?;
            let labels = ids("labels")?;
            if labels.as_ref().is_some_and(|l| l.len() != input_ids.len()) {
                return Err(bad("\"labels\" and \"input_ids\" differ in length".into()));
            }
            Ok(Example::Tokenized { input_ids, labels })
        }
        DatasetFormat::PromptCompletion => Ok(Example::PromptCompletion {
            prompt: string_field(record, "prompt")?,
            completion: string_field(record, "completion")?,
        }),
    }
}

/// The tutorial's `formatting_func`: instruction, then a blank line and the
/// input when there is one, as the user turn; the output as the assistant turn.
fn alpaca_messages(record: &Record) -> Result<Vec<Value>, DataError> {
    let mut prompt = string_field(record, "instruction")?;
    let input = optional_string(record, "input")?.unwrap_or_default();
    if !input.is_empty() {
        prompt.push_str("\n\n");
        prompt.push_str(&input);
    }
    let output = string_field(record, "output")?;
    let mut messages = Vec::new();
    if let Some(system) = optional_string(record, "system")?.filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    if let Some(history) = record.value.get("history").filter(|h| !h.is_null()) {
        let turns = history.as_array().ok_or_else(|| DataError::Record {
            origin: record.origin.clone(),
            message: "field \"history\" must be a list of [question, answer] pairs".into(),
        })?;
        for (i, turn) in turns.iter().enumerate() {
            match turn.as_array().map(|t| t.as_slice()) {
                Some([Value::String(q), Value::String(a)]) => {
                    messages.push(json!({"role": "user", "content": q}));
                    messages.push(json!({"role": "assistant", "content": a}));
                }
                _ => {
                    return Err(DataError::Record {
                        origin: record.origin.clone(),
                        message: format!(
                            "history[{i}] must be a [question, answer] pair of strings"
                        ),
                    })
                }
            }
        }
    }
    messages.push(json!({"role": "user", "content": prompt}));
    messages.push(json!({"role": "assistant", "content": output}));
    Ok(messages)
}

/// Tools as the GLM template wants them: `[{"type": "function", "function": {...}}]`.
/// Accepts a JSON string (glaive data) or a list; plain function specs are wrapped.
fn parse_tools(record: &Record, tools: &Value) -> Result<Value, DataError> {
    let bad = |message: String| DataError::Record {
        origin: record.origin.clone(),
        message,
    };
    let parsed = match tools {
        Value::String(s) if s.trim().is_empty() => Value::Array(vec![]),
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| bad(format!("field \"tools\" is not valid JSON: {e}")))?,
        other => other.clone(),
    };
    let Value::Array(list) = parsed else {
        return Err(bad("field \"tools\" must be a list of tool specs".into()));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.into_iter().enumerate() {
        let Value::Object(obj) = tool else {
            return Err(bad(format!("tools[{i}] is not an object")));
        };
        if obj.contains_key("type") {
            out.push(Value::Object(obj));
            continue;
        }
        // trans_data keeps exactly name, description and parameters, in that order.
        let mut function = Map::new();
        for key in ["name", "description", "parameters"] {
            let v = obj
                .get(key)
                .ok_or_else(|| bad(format!("tools[{i}] has no \"{key}\"")))?;
            function.insert(key.into(), v.clone());
        }
        out.push(json!({"type": "function", "function": Value::Object(function)}));
    }
    Ok(Value::Array(out))
}

/// The tutorial's toolcall `trans_data`: a system turn carrying the tools, then
/// human → user, observation → observation, anything else (gpt, function_call) → assistant.
fn sharegpt_messages(record: &Record) -> Result<Vec<Value>, DataError> {
    let bad = |message: String| DataError::Record {
        origin: record.origin.clone(),
        message,
    };
    let tools = match record.value.get("tools") {
        None | Some(Value::Null) => Value::Array(vec![]),
        Some(t) => parse_tools(record, t)?,
    };
    let Value::Array(turns) = field(record, "conversations")? else {
        return Err(bad(
            "field \"conversations\" must be a list of {from, value} objects".into(),
        ));
    };
    if turns.is_empty() {
        return Err(bad("field \"conversations\" is empty".into()));
    }
    let mut messages = vec![json!({"role": "system", "content": "", "tools": tools})];
    for (i, turn) in turns.iter().enumerate() {
        let (Some(from), Some(value)) =
            (turn.get("from").and_then(Value::as_str), turn.get("value"))
        else {
            return Err(bad(format!(
                "conversations[{i}] needs string fields \"from\" and \"value\""
            )));
        };
        let Some(value) = value.as_str() else {
            return Err(bad(format!("conversations[{i}].value must be a string")));
        };
        let role = match from {
            "human" | "user" => "user",
            "observation" => "observation",
            "gpt" | "function_call" | "assistant" => "assistant",
            "system" => "system",
            other => {
                return Err(bad(format!(
                "conversations[{i}].from {other:?} is not human, gpt, function_call or observation"
            )))
            }
        };
        messages.push(json!({"role": role, "content": value}));
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Origin;

    fn rec(v: Value) -> Record {
        Record {
            value: v,
            origin: Origin {
                file: "t.json".into(),
                index: 3,
                line: None,
            },
        }
    }

    #[test]
    fn detects_formats() {
        assert_eq!(
            DatasetFormat::detect(&json!({"instruction": "a", "input": "", "output": "b"})),
            Some(DatasetFormat::Alpaca)
        );
        assert_eq!(
            DatasetFormat::detect(&json!({"conversations": [], "tools": "[]"})),
            Some(DatasetFormat::Sharegpt)
        );
        assert_eq!(
            DatasetFormat::detect(&json!({"messages": []})),
            Some(DatasetFormat::Messages)
        );
        assert_eq!(
            DatasetFormat::detect(&json!({"prompt": "a", "completion": "b"})),
            Some(DatasetFormat::PromptCompletion)
        );
        assert_eq!(
            DatasetFormat::detect(&json!({"text": "a"})),
            Some(DatasetFormat::Text)
        );
        assert_eq!(DatasetFormat::detect(&json!({"foo": 1})), None);
    }

    #[test]
    fn an_undetected_format_names_the_closest_one_and_the_missing_field() {
        let err = DatasetFormat::Auto
            .resolve(&rec(json!({"instruction": "a", "input": "b"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.json record 3") && err.contains("alpaca") && err.contains("\"output\""),
            "{err}"
        );
        let err = DatasetFormat::Auto
            .resolve(&rec(json!({"prompt": "a"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("prompt_completion") && err.contains("\"completion\""),
            "{err}"
        );
        let err = DatasetFormat::Auto
            .resolve(&rec(json!({"foo": 1})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("alpaca (instruction + output)"), "{err}");
    }

    #[test]
    fn alpaca_joins_instruction_and_input_like_the_tutorial() {
        let ex = to_example(
            &rec(json!({"instruction": "翻译", "input": "hello", "output": "你好"})),
            DatasetFormat::Alpaca,
            "text",
        )
        .unwrap();
        assert_eq!(
            ex,
            Example::Conversation {
                messages: vec![
                    json!({"role": "user", "content": "翻译\n\nhello"}),
                    json!({"role": "assistant", "content": "你好"})
                ]
            }
        );
    }

    #[test]
    fn sharegpt_maps_roles_and_wraps_tools() {
        let r = rec(json!({
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {}}"},
                {"from": "observation", "value": "{}"},
                {"from": "gpt", "value": "a"}
            ],
            "tools": "[{\"name\": \"f\", \"description\": \"d\", \"parameters\": {\"type\": \"object\"}}]"
        }));
        let Example::Conversation { messages } =
            to_example(&r, DatasetFormat::Sharegpt, "text").unwrap()
        else {
            panic!()
        };
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "observation", "assistant"]
        );
        assert_eq!(messages[0]["tools"][0]["type"], "function");
        assert_eq!(messages[0]["tools"][0]["function"]["name"], "f");
    }

    #[test]
    fn errors_name_record_and_field() {
        let err = to_example(
            &rec(json!({"instruction": "a"})),
            DatasetFormat::Alpaca,
            "text",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("t.json record 3") && err.contains("\"output\""),
            "{err}"
        );
        let err = to_example(
            &rec(json!({"instruction": 1, "output": "b"})),
            DatasetFormat::Alpaca,
            "text",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"instruction\" must be a string"), "{err}");
        let err = to_example(
            &rec(json!({"conversations": [{"from": "human", "value": "q"}], "tools": "[{oops"})),
            DatasetFormat::Sharegpt,
            "text",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"tools\" is not valid JSON"), "{err}");
    }
}
