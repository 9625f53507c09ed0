//! Parity with Hugging Face transformers (5.23) on the tiny GLM tokenizer.
//!
//! Fixtures in `tests/fixtures/` are produced by Python:
//! * `chat_template.json`: `tokenizer.apply_chat_template(messages, tools=tools,
//!   add_generation_prompt=..., tokenize=False)` and the ids of that text
//!   (`tokenizer(text, add_special_tokens=False)`);
//! * `encode.json`: `encode` with/without special tokens, `decode` with/without
//!   `skip_special_tokens`, the special-token ids, eos/pad ids and `len(tokenizer)`.

use std::path::PathBuf;

use serde_json::Value;
use trl_like::tokenizer::PreTrainedTokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load_fixture(name: &str) -> Value {
    let path = root().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate the fixtures with the Python reference)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tokenizer() -> PreTrainedTokenizer {
    let dir = root().join("weights/tiny-glm");
    PreTrainedTokenizer::from_pretrained(&dir)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_i64().expect("integer id"))
        .collect()
}

#[test]
fn chat_template_matches_transformers() {
    let tok = tokenizer();
    let fixture = load_fixture("chat_template.json");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let messages = case["messages"].as_array().expect("messages").clone();
        let tools = case.get("tools").filter(|t| !t.is_null());
        let agp = case["add_generation_prompt"]
            .as_bool()
            .expect("add_generation_prompt");
        let expected_text = case["text"].as_str().expect("text");
        let text = match tok.apply_chat_template(&messages, tools, agp) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: render error: {e}"));
                continue;
            }
        };
        if text != expected_text {
            let at = text
                .char_indices()
                .zip(expected_text.chars())
                .find(|((_, a), b)| a != b)
                .map_or(text.len().min(expected_text.len()), |((i, _), _)| i);
            failures.push(format!(
                "{name}: text differs at byte {at}:\n  rust:   {:?}\n  python: {:?}",
                &text[at.saturating_sub(20).min(text.len())..(at + 60).min(text.len())],
                expected_text
                    .get(at.saturating_sub(20)..(at + 60).min(expected_text.len()))
                    .unwrap_or(""),
            ));
            continue;
        }
        let got = tok
            .apply_chat_template_ids(&messages, tools, agp)
            .expect("ids");
        if got != ids(&case["input_ids"]) {
            failures.push(format!(
                "{name}: input_ids differ:\n  rust:   {got:?}\n  python: {:?}",
                ids(&case["input_ids"])
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn encode_decode_match_transformers() {
    let tok = tokenizer();
    let fixture = load_fixture("encode.json");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let with = tok.encode(text, true).expect("encode");
        let without = tok.encode(text, false).expect("encode");
        if with != ids(&case["ids_with_special"]) {
            failures.push(format!(
                "{text:?}: ids_with_special {with:?} != {:?}",
                ids(&case["ids_with_special"])
            ));
        }
        if without != ids(&case["ids_no_special"]) {
            failures.push(format!(
                "{text:?}: ids_no_special {without:?} != {:?}",
                ids(&case["ids_no_special"])
            ));
        }
        // The Python side decodes the ids it produced with special tokens.
        let reference_ids = ids(&case["ids_with_special"]);
        let decoded = tok.decode(&reference_ids, false).expect("decode");
        let decoded_skip = tok.decode(&reference_ids, true).expect("decode");
        if decoded != case["decoded"].as_str().expect("decoded") {
            failures.push(format!(
                "{text:?}: decoded {decoded:?} != {:?}",
                case["decoded"]
            ));
        }
        if decoded_skip != case["decoded_skip"].as_str().expect("decoded_skip") {
            failures.push(format!(
                "{text:?}: decoded_skip {decoded_skip:?} != {:?}",
                case["decoded_skip"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn special_tokens_match_transformers() {
    let tok = tokenizer();
    let fixture = load_fixture("encode.json");
    let specials = fixture["special_tokens"]
        .as_object()
        .expect("special_tokens");
    assert!(!specials.is_empty());
    for (token, id) in specials {
        assert_eq!(
            tok.token_to_id(token),
            id.as_i64(),
            "token_to_id({token:?})"
        );
        assert_eq!(
            tok.id_to_token(id.as_i64().unwrap()).as_deref(),
            Some(token.as_str()),
            "id_to_token({id})"
        );
    }
    assert_eq!(tok.eos_token_id(), fixture["eos_token_id"].as_i64());
    assert_eq!(tok.pad_token_id(), fixture["pad_token_id"].as_i64());
    if let Some(n) = fixture.get("vocab_size").and_then(Value::as_u64) {
        assert_eq!(tok.vocab_size() as u64, n, "len(tokenizer)");
    }
}
