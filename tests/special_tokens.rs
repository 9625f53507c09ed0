//! TRL's tokenizer settings of SFTConfig change what is trained:
//! `chat_template_path` (a Jinja file or a tokenizer directory), `eos_token`,
//! and examples that truncation left without a token to learn from are dropped
//! with a count. `glm4 preview --json` shows the token ids the trainer uses
//! (both go through the same preparation).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glm4-special-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn glm4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// The first record of `glm4 preview --json` with the tiny model and `extra` flags.
fn preview_first(model: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "preview",
        "--model_name_or_path",
        model,
        "--data_files",
        "data/demo_alpaca.json",
        "--num_examples",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = glm4(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

const CUSTOM: &str = "CUSTOM{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}\
                      {% if add_generation_prompt %}[assistant]{% endif %}";

#[test]
fn chat_template_file_changes_what_is_trained() {
    let dir = tmp("jinja");
    let tpl = dir.join("custom.jinja");
    std::fs::write(&tpl, CUSTOM).unwrap();
    let default = preview_first("weights/tiny-glm", &[]);
    let custom = preview_first(
        "weights/tiny-glm",
        &["--chat_template_path", tpl.to_str().unwrap()],
    );
    let text = custom["text"].as_str().unwrap();
    assert!(
        text.starts_with("CUSTOM[user]你好，告诉我你的名字。[assistant]你好！"),
        "{text}"
    );
    assert_ne!(custom["input_ids"], default["input_ids"]);

    // The trainer uses it too, and saves it with the tokenizer.
    let out = dir.join("out");
    let o = glm4(&[
        "sft",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        "data/demo_alpaca.json",
        "--output_dir",
        out.to_str().unwrap(),
        "--chat_template_path",
        tpl.to_str().unwrap(),
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--no_predict",
        "--bf16",
        "false",
        "--disable_tqdm",
        "true",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let saved: String = ["chat_template.jinja", "tokenizer_config.json"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(out.join(f)).ok())
        .collect();
    assert!(saved.contains("CUSTOM{% for m in messages %}"), "{saved}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the tiny model's tokenizer whose config carries `template`.
fn tokenizer_dir_with(dir: &Path, template: &str) -> PathBuf {
    let t = dir.join("tok");
    std::fs::create_dir_all(&t).unwrap();
    let src = root().join("weights/tiny-glm");
    std::fs::copy(src.join("tokenizer.json"), t.join("tokenizer.json")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg["chat_template"] = Value::String(template.into());
    cfg["eos_token"] = Value::String("<|user|>".into());
    std::fs::write(t.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    t
}

#[test]
fn chat_template_path_takes_a_tokenizer_directory_and_its_eos() {
    let dir = tmp("dir");
    let tok = tokenizer_dir_with(&dir, CUSTOM);
    let custom = preview_first(
        "weights/tiny-glm",
        &["--chat_template_path", tok.to_str().unwrap()],
    );
    let text = custom["text"].as_str().unwrap();
    // TRL's clone_chat_template takes the source's eos token along with its template.
    assert!(
        text.starts_with("CUSTOM[user]") && text.ends_with("<|user|>"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eos_token_ends_every_text() {
    let default = preview_first("weights/tiny-glm", &[]);
    let custom = preview_first("weights/tiny-glm", &["--eos_token", "<|observation|>"]);
    assert!(default["text"].as_str().unwrap().ends_with("<|endoftext|>"));
    let text = custom["text"].as_str().unwrap();
    assert!(text.ends_with("<|observation|>"), "{text}");
    let last = |v: &Value| v["input_ids"].as_array().unwrap().last().unwrap().clone();
    assert_ne!(last(&custom), last(&default));
    // It carries loss: the model learns to stop with it.
    assert_eq!(
        custom["labels"].as_array().unwrap().last(),
        Some(&last(&custom))
    );
}

#[test]
fn examples_truncated_to_no_loss_are_dropped_with_a_count() {
    let dir = tmp("drop");
    let long = "很长的问题".repeat(20);
    let mut recs: Vec<String> = (0..2)
        .map(|i| format!("{{\"prompt\": \"{long}{i}\", \"completion\": \"答{i}\"}}"))
        .collect();
    recs.extend((0..2).map(|i| format!("{{\"prompt\": \"问{i}\", \"completion\": \"答{i}\"}}")));
    let data = dir.join("pc.jsonl");
    std::fs::write(&data, recs.join("\n")).unwrap();
    let out = dir.join("out");
    let o = glm4(&[
        "sft",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        data.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--max_length",
        "12",
        "--test_size",
        "0",
        "--eval_strategy",
        "no",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
        "--no_predict",
        "--bf16",
        "false",
        "--disable_tqdm",
        "true",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("dropped 2 of 4 training examples with no token to learn from")
            && err.contains("max_length 12"),
        "{err}"
    );
    assert!(err.contains("examples = 2"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
