//! The data pipeline on real inputs: the tutorial's Chinese Alpaca-GPT4 sample
//! and tool-call conversations from `../shared/data`, plus loss masks
//! (assistant-only, completion-only) on the tiny GLM-4 tokenizer.

use serde_json::json;
use std::path::PathBuf;
use trl_like::data::tokenize::{tokenize_example, IGNORE_INDEX};
use trl_like::data::{formats, Dataset, DatasetFormat, Example, TokenizeOptions};
use trl_like::tokenizer::PreTrainedTokenizer;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> PreTrainedTokenizer {
    PreTrainedTokenizer::from_pretrained(repo().join("weights/tiny-glm")).unwrap()
}

fn shared(name: &str) -> Option<PathBuf> {
    let p = repo().join("../shared/data").join(name);
    if !p.exists() {
        eprintln!("SKIP: {} not present", p.display());
    }
    p.exists().then_some(p)
}

#[test]
fn tutorial_alpaca_sample_goes_through_the_pipeline() {
    let Some(path) = shared("alpaca_zh_demo.json") else {
        return;
    };
    let ds = Dataset::from_json_files(&[path]).unwrap();
    assert_eq!(ds.len(), 1000);
    let format = DatasetFormat::Auto.resolve(&ds.records[0]).unwrap();
    assert_eq!(format, DatasetFormat::Alpaca);
    let tok = tokenizer();
    let opts = TokenizeOptions {
        max_length: Some(512),
        ..Default::default()
    };
    let mut truncated = 0;
    for r in &ds.records {
        let ex = formats::to_example(r, format, "text").unwrap();
        let t = tokenize_example(&tok, &ex, &opts).unwrap();
        assert!(t.text.starts_with("[gMASK]<sop><|user|>\n"), "{}", t.text);
        assert!(t.input_ids.len() <= 512);
        assert_eq!(
            &t.input_ids[..2],
            &[
                tok.token_to_id("[gMASK]").unwrap(),
                tok.token_to_id("<sop>").unwrap()
            ]
        );
        assert_ne!(
            t.input_ids[2], t.input_ids[0],
            "[gMASK]<sop> must not be doubled"
        );
        if t.truncated_tokens > 0 {
            truncated += 1;
        } else {
            assert_eq!(
                *t.input_ids.last().unwrap(),
                tok.eos_token_id().unwrap(),
                "eos ends every untruncated example"
            );
        }
    }
    assert!(
        truncated > 0 && truncated < 1000,
        "some, not all, records exceed 512 tiny-tokenizer tokens ({truncated})"
    );
}

#[test]
fn tutorial_toolcall_conversations_go_through_the_pipeline() {
    let Some(path) = shared("glaive_toolcall_zh_1k.json") else {
        return;
    };
    let ds = Dataset::from_json_files(&[path]).unwrap();
    let format = DatasetFormat::Auto.resolve(&ds.records[0]).unwrap();
    assert_eq!(format, DatasetFormat::Sharegpt);
    let tok = tokenizer();
    let mut with_tools = 0;
    for r in &ds.records {
        let ex = formats::to_example(r, format, "text").unwrap();
        let Example::Conversation { messages } = &ex else {
            panic!("conversation expected")
        };
        assert_eq!(messages[0]["role"], "system");
        if messages[0]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
        {
            with_tools += 1;
        }
        let t = tokenize_example(&tok, &ex, &TokenizeOptions::default()).unwrap();
        assert!(
            t.text.starts_with("[gMASK]<sop><|system|>\n"),
            "{}",
            &t.text[..60]
        );
    }
    // Counted with Python: 656 of the 1,000 records have a non-empty tools list.
    assert_eq!(with_tools, 656);
}

#[test]
fn assistant_only_loss_covers_answers_and_their_stop_token() {
    let tok = tokenizer();
    let ex = Example::Conversation {
        messages: vec![
            json!({"role": "user", "content": "你好"}),
            json!({"role": "assistant", "content": "你好！我是小G。"}),
            json!({"role": "user", "content": "1+2等于多少？"}),
            json!({"role": "assistant", "content": "1+2等于3。"}),
        ],
    };
    let opts = TokenizeOptions {
        assistant_only_loss: true,
        ..Default::default()
    };
    let t = tokenize_example(&tok, &ex, &opts).unwrap();
    let kept: Vec<i64> = t
        .labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect();
    let text = tok.decode(&kept, false).unwrap();
    // Each answer (after its "\n") plus the token that ends it: <|user|>, then eos.
    assert_eq!(text, "\n你好！我是小G。<|user|>\n1+2等于3。<|endoftext|>");
    assert_eq!(t.labels.len(), t.input_ids.len());
}

#[test]
fn completion_only_loss_skips_the_prompt() {
    let tok = tokenizer();
    let ex = Example::PromptCompletion {
        prompt: "1+2等于".into(),
        completion: "3。".into(),
    };
    let t = tokenize_example(&tok, &ex, &TokenizeOptions::default()).unwrap();
    let kept: Vec<i64> = t
        .labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect();
    assert_eq!(tok.decode(&kept, false).unwrap(), "3。<|endoftext|>");
    let all = tokenize_example(
        &tok,
        &ex,
        &TokenizeOptions {
            completion_only_loss: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        all.labels, all.input_ids,
        "completion_only_loss false: loss on every token"
    );
}
