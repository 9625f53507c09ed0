//! `glm4 dpo` end to end on the tiny model: `make dpo`'s config, shortened,
//! raises rewards/margins and rewards/accuracies; bad preference records and
//! a non-positive beta stop the run with one line naming what to fix.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

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

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("glm4-dpo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// `make dpo` with 3 epochs instead of 10 and no answers at checkpoints.
#[test]
fn make_dpo_config_raises_margins_and_accuracies() {
    let out = tmp("demo");
    let res = glm4(&[
        "dpo",
        "--config",
        "configs/dpo.yaml",
        "--output_dir",
        out.to_str().unwrap(),
        "--num_train_epochs",
        "3",
        "--logging_steps",
        "3",
        "--save_strategy",
        "no",
        "--no_predict",
        "--disable_tqdm",
        "true",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("sharegpt preference"), "{err}");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    let logs: Vec<&Value> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("rewards/margins").is_some())
        .collect();
    assert!(logs.len() >= 4, "{logs:?}");
    let get = |e: &Value, k: &str| e[k].as_f64().unwrap();
    let (first, last) = (logs[0], logs[logs.len() - 1]);
    assert!(
        get(last, "rewards/margins") > get(first, "rewards/margins") + 1.0,
        "margins did not rise: {first} -> {last}"
    );
    assert!(
        get(last, "rewards/accuracies") > get(first, "rewards/accuracies"),
        "accuracies did not rise: {first} -> {last}"
    );
    assert!(get(last, "rewards/accuracies") >= 0.75, "{last}");
    for key in [
        "loss",
        "grad_norm",
        "learning_rate",
        "entropy",
        "num_tokens",
        "mean_token_accuracy",
        "logits/chosen",
        "logits/rejected",
        "logps/chosen",
        "logps/rejected",
        "rewards/chosen",
        "rewards/rejected",
    ] {
        assert!(last.get(key).is_some(), "{key} not logged: {last}");
    }
    assert!(out.join("adapter_model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let res = glm4(args);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: no {n:?} in\n{err}");
    }
}

#[test]
fn bad_preference_data_and_beta_name_what_to_fix() {
    let dir = tmp("bad");
    let write = |name: &str, v: Value| {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
        p.display().to_string()
    };
    let common = |data: &str| -> Vec<String> {
        [
            "dpo",
            "--config",
            "configs/dpo.yaml",
            "--data_files",
            data,
            "--output_dir",
            dir.join("out").to_str().unwrap(),
            "--max_steps",
            "1",
            "--no_predict",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |data: &str, needles: &[&str]| {
        let args = common(data);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, needles);
    };
    let good = serde_json::json!({"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"});
    let missing = write(
        "missing.json",
        serde_json::json!([good, {"prompt": "Q: 2+2?", "chosen": " 4"}]),
    );
    run(&missing, &["missing.json record 1", "\"rejected\""]);
    let not_assistant = write(
        "role.json",
        serde_json::json!([{"prompt": [{"role": "user", "content": "hi"}],
                            "chosen": [{"role": "user", "content": "hello"}],
                            "rejected": [{"role": "assistant", "content": "go away"}]}]),
    );
    run(
        &not_assistant,
        &["role.json record 0", "\"chosen\"", "assistant"],
    );
    let empty = write(
        "empty.json",
        serde_json::json!([{"prompt": "", "chosen": "a", "rejected": "b"}]),
    );
    run(&empty, &["empty.json record 0", "\"prompt\" is empty"]);
    let ok = write("ok.json", serde_json::json!([good]));
    let mut args = common(&ok);
    args.extend(["--beta".to_string(), "0".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, &["beta", "> 0"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dpo_help_lists_the_dpo_fields() {
    let res = glm4(&["dpo", "--help"]);
    assert!(res.status.success());
    let out = String::from_utf8_lossy(&res.stdout);
    for flag in [
        "--beta",
        "--loss_type",
        "--precompute_ref_log_probs",
        "--learning_rate",
        "--lora_r",
    ] {
        assert!(out.contains(flag), "{flag} missing from glm4 dpo --help");
    }
}

/// `glm4 preview` on preference data: prompt / chosen / rejected, and the
/// same ids TRL's DPOTrainer produced (tests/fixtures/dpo/tokenize.json).
#[test]
fn preview_shows_pairs_as_trl_tokenizes_them() {
    let args = [
        "preview",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        "data/demo_dpo.json",
        "--num_examples",
        "2",
    ];
    let res = glm4(&args);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let text = String::from_utf8_lossy(&res.stdout);
    for part in [
        "sharegpt preference",
        "[prompt]",
        "[chosen]",
        "[rejected]",
        "48 pairs",
    ] {
        assert!(text.contains(part), "{part} missing:\n{text}");
    }
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let res = glm4(&json_args);
    assert!(res.status.success());
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/dpo/tokenize.json")).unwrap(),
    )
    .unwrap();
    let lines: Vec<Value> = String::from_utf8_lossy(&res.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (got, want) in lines
        .iter()
        .zip(fixture["expected"]["sharegpt"].as_array().unwrap())
    {
        for k in ["prompt_ids", "chosen_ids", "rejected_ids"] {
            assert_eq!(got[k], want[k], "{k}");
        }
    }
}

/// A run resumed from its step-2 checkpoint logs bit-identical steps 3 and 4
/// (the shared core's resume, with DPO's pairs and reference).
#[test]
fn resume_is_bit_exact() {
    let base = [
        "dpo",
        "--config",
        "configs/dpo.yaml",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--save_total_limit",
        "5",
        "--no_predict",
        "--disable_tqdm",
        "true",
    ];
    let run = |dir: &PathBuf, extra: &[&str]| {
        let mut args = base.to_vec();
        let d = dir.display().to_string();
        args.extend(["--output_dir", d.as_str()]);
        args.extend(extra);
        let res = glm4(&args);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
    };
    let (a, b) = (tmp("resume-a"), tmp("resume-b"));
    run(&a, &[]);
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&a.join("checkpoint-2"), &b.join("checkpoint-2"));
    run(&b, &["--resume_from_checkpoint", "true"]);
    let steps = |dir: &PathBuf| -> Vec<Value> {
        let s: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
                .unwrap();
        s["log_history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e.get("rewards/margins").is_some() && e["step"].as_u64() > Some(2))
            .cloned()
            .collect()
    };
    let (sa, sb) = (steps(&a), steps(&b));
    assert_eq!(sa.len(), 2);
    for (x, y) in sa.iter().zip(&sb) {
        for k in [
            "loss",
            "grad_norm",
            "rewards/margins",
            "logps/chosen",
            "num_tokens",
        ] {
            assert_eq!(x[k], y[k], "{k} after resume");
        }
    }
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}
