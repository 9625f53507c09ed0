//! What the Make targets run, checked end to end: `make demo` learns the demo
//! data on CPU, `make train` explains itself on a machine without CUDA, and the
//! custom-callback example of `trl_like` runs.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `make demo`: loss falls by more than half, and at the last checkpoint the
/// model answers the tutorial's two questions with what the demo data teaches.
#[test]
fn demo_visibly_learns() {
    let out = std::env::temp_dir().join(format!("glm4-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let res = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "sft",
            "--config",
            "configs/demo.yaml",
            "--output_dir",
            out.to_str().unwrap(),
            "--disable_tqdm",
            "true",
            "--predict_max_new_tokens",
            "32",
            "--report_to",
            "none",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("glm4 chat --model_name_or_path"),
        "the demo ends by saying how to chat with the result"
    );
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    let losses: Vec<f64> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["loss"].as_f64())
        .collect();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < first / 2.0,
        "training loss should fall by at least half: {first} -> {last}"
    );
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let last_step = predictions
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect::<Vec<_>>();
    let final_step = last_step.last().unwrap()["step"].clone();
    let answers: Vec<String> = last_step
        .iter()
        .filter(|p| p["step"] == final_step)
        .map(|p| p["response"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(answers.len(), 2);
    assert!(answers[0].contains("小G"), "name answer: {:?}", answers[0]);
    assert!(
        answers[1].contains("1+2等于3"),
        "arithmetic answer: {:?}",
        answers[1]
    );
    for f in [
        "adapter_model.safetensors",
        "training_curves.png",
        "training_curves.svg",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `make train` without CUDA stops before downloading or loading anything and points to `make demo`.
#[test]
fn train_without_cuda_explains_and_points_to_demo() {
    if tch::Cuda::is_available() {
        eprintln!("SKIP: this machine has CUDA");
        return;
    }
    let res = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "sft",
            "--config",
            "configs/tutorial.yaml",
            "--model_name_or_path",
            "./weights/glm-4-9b-hf",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("CUDA") && err.contains("make demo") && err.contains("24 GB"),
        "{err}"
    );
    assert!(
        !err.contains("downloading"),
        "nothing may be downloaded first: {err}"
    );
}

/// The `trl_like` example with a user-defined callback (built by `make build`).
#[test]
fn custom_callback_example_stops_training() {
    let exe = root().join("target/release/examples/custom_callback");
    if !exe.exists() {
        eprintln!(
            "SKIP: {} not built (make build builds all targets)",
            exe.display()
        );
        return;
    }
    let res = Command::new(exe).current_dir(root()).output().unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        stdout.contains("stopping") && stdout.contains("eval_loss"),
        "{stdout}"
    );
}

/// `make toolcall` on the tiny model: the glaive conversations with tools train,
/// and the callback asks the tool question with the tools on a system message.
#[test]
fn toolcall_variant_runs_with_its_prompts() {
    let data = root().join("../shared/data/glaive_toolcall_zh_demo.json");
    if !data.exists() {
        eprintln!("SKIP: {} not present", data.display());
        return;
    }
    let out = std::env::temp_dir().join(format!("glm4-toolcall-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let res = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "sft",
            "--config",
            "configs/toolcall.yaml",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--data_files",
            data.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
            "--max_steps",
            "2",
            "--bf16",
            "false",
            "--disable_tqdm",
            "true",
            "--predict_max_new_tokens",
            "4",
            "--predict_prompt",
            "你叫什么名字？",
            "--predict_prompt",
            "告诉我北京的天气怎么样？",
            "--predict_tools",
            "configs/toolcall_predict_tools.json",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    let lines: Vec<Value> = predictions
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // save_steps 0.2 of 2 steps = every ceil(0.4) = 1 step: two saves, two questions each.
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["prompt"], "你叫什么名字？");
    let tool_prompt = lines[3]["text"].as_str().unwrap();
    assert!(
        tool_prompt.contains("## get_today_weather")
            && tool_prompt.contains("告诉我北京的天气怎么样？"),
        "{tool_prompt}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
