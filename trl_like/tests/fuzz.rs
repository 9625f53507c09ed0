//! Property tests: whatever bytes a data file or a command line holds, loading
//! and parsing never panic and never hang — they return data or an error.
//! `make fuzz` runs many more cases (PROPTEST_CASES).

use proptest::prelude::*;
use trl_like::config::{DataArguments, ModelConfig, SFTConfig, TrlParser};
use trl_like::data::{formats, Dataset, DatasetFormat};

const FORMATS: [DatasetFormat; 7] = [
    DatasetFormat::Auto,
    DatasetFormat::Alpaca,
    DatasetFormat::Sharegpt,
    DatasetFormat::Messages,
    DatasetFormat::Text,
    DatasetFormat::PromptCompletion,
    DatasetFormat::Tokenized,
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i32>().prop_map(|n| serde_json::json!(n)),
        "[a-z\\[\\]{}\":,0-9 ]{0,12}".prop_map(serde_json::Value::String),
        prop::sample::select(vec![
            "human",
            "gpt",
            "function_call",
            "observation",
            "user",
            "[{\"name\": \"f\"}]"
        ])
        .prop_map(|s| serde_json::Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let keys = prop::sample::select(vec![
            "instruction",
            "input",
            "output",
            "conversations",
            "from",
            "value",
            "tools",
            "messages",
            "role",
            "content",
            "text",
            "prompt",
            "completion",
            "history",
            "system",
            "input_ids",
            "labels",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::vec((keys, inner), 0..5).prop_map(|kv| serde_json::Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// 256 cases per property in `make test`; `make fuzz` sets PROPTEST_CASES much higher.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn load(text: &str) -> Result<Dataset, trl_like::data::DataError> {
    let dir = std::env::temp_dir().join(format!("trl_like-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{:x}.json",
        text.len() * 31 + text.bytes().map(usize::from).sum::<usize>()
    ));
    std::fs::write(&path, text).unwrap();
    let r = Dataset::from_json_files(&[&path]);
    let _ = std::fs::remove_file(&path);
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Arbitrary text as a data file: an error or records, never a panic.
    #[test]
    fn data_files_never_panic(text in "\\PC{0,200}") {
        let _ = load(&text);
    }

    /// Arbitrary JSON records through every format converter: an error or an example.
    #[test]
    fn records_never_panic(records in prop::collection::vec(json_value(), 1..6)) {
        let text = serde_json::to_string(&records).unwrap();
        if let Ok(ds) = load(&text) {
            for r in &ds.records {
                for f in FORMATS {
                    let _ = formats::to_example(r, f, "text");
                }
            }
        }
    }

    /// Arbitrary command lines built from real flag names, values and noise.
    #[test]
    fn flags_never_panic(words in prop::collection::vec(prop_oneof![
        prop::sample::select(vec!["--learning_rate", "--lora_r", "--eval_steps", "--max_length", "--max_seq_length",
            "--bf16", "--no_bf16", "--lora_target_modules", "--report_to", "--lr_scheduler_kwargs", "--config",
            "--data_files", "--test_size", "--seed", "--output_dir", "--save_total_limit", "--dtype", "-h"]).prop_map(String::from),
        "[-=a-z0-9.{}\":]{0,10}",
        prop::sample::select(vec!["none", "true", "false", "1e-4", "-1", "0", "0.5", "1.5", "nan", "inf", "{\"a\": 1}"]).prop_map(String::from),
    ], 0..10)) {
        let parser = TrlParser::new(ModelConfig::default(), DataArguments::default(), SFTConfig::default());
        let _ = parser.parse(&words);
    }

    /// Arbitrary YAML config files.
    #[test]
    fn yaml_configs_never_panic(text in "[a-z_:\\- \\n\\[\\]{}0-9.\"']{0,120}") {
        let dir = std::env::temp_dir().join(format!("trl_like-fuzz-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(&path, &text).unwrap();
        let parser = TrlParser::new(ModelConfig::default(), DataArguments::default(), SFTConfig::default());
        let _ = parser.parse(&["--config".to_string(), path.display().to_string()]);
    }
}
