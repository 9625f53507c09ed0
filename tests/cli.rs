//! Drives the `glm4` binary the way the README tells a user to, on the
//! embedded tiny model; expected token ids come from the transformers fixtures.

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn glm4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("glm4 runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture_case(arch: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(root().join(format!("tests/fixtures/{arch}_generate.json")))
        .unwrap();
    let fx: Value = serde_json::from_str(&text).unwrap();
    fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .expect("fixture case")
        .clone()
}

fn ids(v: &Value) -> Vec<i64> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn env_reports_libtorch_and_cuda() {
    let out = glm4(&["env"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("libtorch version: 2.11.0"), "{text}");
    assert!(text.contains("CUDA available:"), "{text}");
    assert!(text.contains("c10d backends (torchrun): gloo"), "{text}");
}

/// `glm4 generate --json` on a plain prompt gives transformers' greedy ids,
/// and the prompt is encoded like `tokenizer.encode` (with `[gMASK]<sop>`).
#[test]
fn generate_plain_prompt_matches_transformers() {
    let case = fixture_case("glm", "single_unpadded");
    let out = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--prompt",
        "我是ChatGLM，是",
        "--max_new_tokens",
        "12",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object on stdout");
    let prompt = ids(&case["input_ids"][0]);
    let full = ids(&case["output_ids"][0]);
    assert_eq!(ids(&got["prompt_ids"]), prompt);
    assert_eq!(ids(&got["generated_ids"]), full[prompt.len()..].to_vec());
}

/// `--chat` renders one user message with the generation prompt, as the
/// tutorial's callback does; the answer equals transformers' for that row.
#[test]
fn generate_chat_matches_transformers() {
    let case = fixture_case("glm", "chat_batch_left_padded");
    let pad = 1900;
    let row = ids(&case["input_ids"][0]);
    let prompt: Vec<i64> = row.iter().copied().skip_while(|&t| t == pad).collect();
    let full = ids(&case["output_ids"][0]);
    let out = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--chat",
        "--prompt",
        "你好，告诉我你的名字。",
        "--max_new_tokens",
        "12",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(ids(&got["prompt_ids"]), prompt);
    assert_eq!(ids(&got["generated_ids"]), full[row.len()..].to_vec());
}

/// Plain-text mode prints only the continuation.
#[test]
fn generate_text_output_is_the_continuation() {
    let json = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm4",
        "--prompt",
        "你好",
        "--max_new_tokens",
        "8",
        "--json",
    ]);
    let text = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm4",
        "--prompt",
        "你好",
        "--max_new_tokens",
        "8",
    ]);
    assert!(
        json.status.success() && text.status.success(),
        "{}{}",
        stderr(&json),
        stderr(&text)
    );
    let got: Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(
        stdout(&text),
        format!("{}\n", got["text"].as_str().unwrap())
    );
}

/// `glm4 chat` on the tiny model, greedy and without a repetition penalty,
/// with `input` on its stdin and `max_length` tokens per answer.
fn piped_chat(max_length: &str, input: &[u8]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "chat",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--do_sample",
            "false",
            "--repetition_penalty",
            "1.0",
            "--max_length",
            max_length,
        ])
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// A piped chat answers each line; with greedy decoding and no penalty the
/// first answer equals `generate --chat` for the same message.
#[test]
fn piped_chat_answers_each_line() {
    let out = piped_chat("40", "你好\n告诉我1+2等于多少？\nexit\n".as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    // chat's --max_length is the answer budget, as in the tutorial's chat_cli.py.
    let single = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--chat",
        "--prompt",
        "你好",
        "--max_new_tokens",
        "40",
    ]);
    let expected_first = stdout(&single);
    assert!(
        stdout(&out).starts_with(&expected_first),
        "chat's first answer {:?} should be {:?}",
        stdout(&out),
        expected_first
    );
    assert!(
        stdout(&out).len() > expected_first.len(),
        "the second line got no answer"
    );
}

/// A line that is not UTF-8 is skipped with a message naming it; the session
/// goes on and answers the next line (it used to end the whole chat).
#[test]
fn chat_skips_an_invalid_utf8_line() {
    let mut input = b"caf\xe9 in Latin-1\n".to_vec();
    input.extend_from_slice("你好\nexit\n".as_bytes());
    let out = piped_chat("12", &input);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("input line 1 is not valid UTF-8 text: skipped"),
        "{}",
        stderr(&out)
    );
    let single = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--chat",
        "--prompt",
        "你好",
        "--max_new_tokens",
        "12",
    ]);
    assert!(single.status.success(), "{}", stderr(&single));
    assert_eq!(
        stdout(&out),
        stdout(&single),
        "the line after the bad one is answered"
    );
}

#[test]
fn missing_model_directory_is_a_clear_error() {
    let out = glm4(&[
        "generate",
        "--model_name_or_path",
        "weights/does-not-exist",
        "--prompt",
        "hi",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("weights/does-not-exist") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn download_fails_fast_and_clearly_when_offline() {
    let out = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "download",
            "THUDM/glm-4-9b-hf",
            "--local_dir",
            "target/test-download",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("HF_HUB_OFFLINE"), "{}", stderr(&out));
}

/// The binary keeps libtorch_cuda.so as a dependency (so CUDA works on GPU
/// machines) and carries an rpath to libtorch (so it runs without LD_LIBRARY_PATH).
#[test]
fn binary_links_libtorch_cuda_and_has_rpath() {
    let Ok(out) = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_glm4")])
        .output()
    else {
        eprintln!("readelf not installed; skipping");
        return;
    };
    let text = stdout(&out);
    assert!(
        text.contains("[libtorch_cuda.so]"),
        "libtorch_cuda.so is not NEEDED:\n{text}"
    );
    assert!(
        text.contains("RUNPATH") || text.contains("RPATH"),
        "no rpath:\n{text}"
    );
}

/// `glm4 sft --help` lists every TRL field with the tutorial's defaults, plus the glm4 options.
#[test]
fn sft_help_lists_fields_and_tutorial_defaults() {
    let out = glm4(&["sft", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "--learning_rate",
        "--lora_target_modules",
        "--data_files",
        "--max_length",
        "--predict_prompt",
        "[default: 0.0005]",
    ] {
        assert!(text.contains(needle), "help lacks {needle}");
    }
}

/// A typo in a flag is an error with a suggestion, not a panic.
#[test]
fn sft_flag_typo_suggests_the_field() {
    let out = glm4(&["sft", "--learning_rat", "1e-4"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--learning_rate") && !err.contains("panicked"),
        "{err}"
    );
}
