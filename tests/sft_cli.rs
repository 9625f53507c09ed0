//! `glm4 sft`, `glm4 preview` and `glm4 merge` end to end on the tiny model:
//! outputs in the formats Python opens, checkpoint rotation, exact resume after
//! a crash, and the data pipeline against TRL's own tokenization.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::Tensor;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn glm4(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glm4"));
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("glm4 runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "glm4 failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("glm4-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// The project's Python reference (transformers + PEFT in .venv), when installed.
fn python() -> Option<PathBuf> {
    let py = root().join(".venv/bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import transformers, peft"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: .venv has no transformers/peft (run `make test`, which installs them)");
    }
    ok.then_some(py)
}

fn py_json(py: &Path, args: &[&str]) -> Value {
    let out = Command::new(py)
        .arg(root().join("scripts/check_interop.py"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check_interop.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// Common flags: the tiny model and the project's demo data, a short run.
fn sft_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "sft",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        "data/demo_alpaca.json",
        "--output_dir",
        out,
        "--per_device_train_batch_size",
        "4",
        "--max_length",
        "64",
        "--learning_rate",
        "5e-3",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--predict_max_new_tokens",
        "6",
        "--bf16",
        "false",
    ];
    v.extend_from_slice(extra);
    v
}

fn state(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()).unwrap()
}

fn adapter(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn sft_writes_python_compatible_outputs_and_rotates_checkpoints() {
    let out = tmp("sft");
    let o = out.to_str().unwrap();
    ok(&glm4(
        &sft_args(
            o,
            &[
                "--max_steps",
                "6",
                "--save_steps",
                "2",
                "--save_total_limit",
                "2",
                "--report_to",
                "all",
            ],
        ),
        &[],
    ));
    // Rotation keeps the two newest checkpoints.
    let mut ckpts: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, ["checkpoint-4", "checkpoint-6"]);
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "trainer_state.json",
        "training_curves.svg",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let st = state(&out);
    assert_eq!(st["global_step"], 6);
    assert_eq!(st["max_steps"], 6);
    let history = st["log_history"].as_array().unwrap();
    assert_eq!(
        history.iter().filter(|e| e.get("loss").is_some()).count(),
        6
    );
    assert!(history.last().unwrap().get("train_runtime").is_some());
    // Three saves, two questions each.
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 6);
    let runs = out.join("runs");
    assert!(runs.join("metrics.jsonl").is_file());
    assert!(std::fs::read_dir(&runs).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("events.out.tfevents")));

    // Python opens the adapter (no missing/unexpected keys) and generates what we generate.
    let ours = glm4(
        &[
            "generate",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--adapter_path",
            o,
            "--prompt",
            "你好",
            "--max_new_tokens",
            "8",
            "--json",
        ],
        &[],
    );
    let ours: Value = serde_json::from_str(ok(&ours).trim()).unwrap();
    if let Some(py) = python() {
        let theirs = py_json(&py, &["peft", "weights/tiny-glm", o, "你好", "8"]);
        assert_eq!(theirs["missing"], serde_json::json!([]));
        assert_eq!(theirs["unexpected"], serde_json::json!([]));
        assert_eq!(
            theirs["ids"], ours["generated_ids"],
            "PEFT's greedy ids differ from glm4 generate --adapter_path"
        );
        let st = py_json(
            &py,
            &["state", out.join("trainer_state.json").to_str().unwrap()],
        );
        assert_eq!(st["global_step"], 6);
    }

    // `make chat`: the adapter in a piped chat.
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "chat",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--adapter_path",
            o,
            "--max_length",
            "8",
        ])
        .current_dir(root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all("你好\nquit\n".as_bytes())
        .unwrap();
    ok(&child.wait_with_output().unwrap());

    // merge: a plain checkpoint that generates like base + adapter, here and in transformers.
    let merged = tmp("merged");
    let m = merged.to_str().unwrap();
    ok(&glm4(
        &[
            "merge",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--adapter_path",
            o,
            "--output_dir",
            m,
        ],
        &[],
    ));
    let from_merged = glm4(
        &[
            "generate",
            "--model_name_or_path",
            m,
            "--prompt",
            "你好",
            "--max_new_tokens",
            "8",
            "--json",
        ],
        &[],
    );
    let from_merged: Value = serde_json::from_str(ok(&from_merged).trim()).unwrap();
    assert_eq!(from_merged["generated_ids"], ours["generated_ids"]);
    if let Some(py) = python() {
        let theirs = py_json(&py, &["hf", m, "你好", "8"]);
        assert_eq!(
            theirs["ids"], ours["generated_ids"],
            "transformers' greedy ids on the merged model differ"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&merged);
}

/// Losses and weights of a run that crashed and resumed equal an uninterrupted run.
fn resumed_equals_uninterrupted(name: &str, crash_var: &str, crash_step: &str) {
    let extra = [
        "--max_steps",
        "8",
        "--save_steps",
        "2",
        "--lora_dropout",
        "0.1",
        "--no_predict",
    ];
    let straight = tmp(&format!("{name}-straight"));
    ok(&glm4(&sft_args(straight.to_str().unwrap(), &extra), &[]));

    let crashed = tmp(&format!("{name}-crashed"));
    let c = crashed.to_str().unwrap();
    let died = glm4(&sft_args(c, &extra), &[(crash_var, crash_step)]);
    assert!(!died.status.success(), "the injected crash did not happen");
    assert!(
        !crashed.join("trainer_state.json").exists(),
        "a crashed run must not look finished"
    );
    let resumed = glm4(&sft_args(c, &extra), &[]);
    let log = String::from_utf8_lossy(&resumed.stderr).into_owned();
    ok(&resumed);
    assert!(log.contains("resuming from"), "{log}");

    let numeric = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64);
    let (a, b) = (state(&straight), state(&crashed));
    let (ha, hb) = (
        a["log_history"].as_array().unwrap(),
        b["log_history"].as_array().unwrap(),
    );
    assert_eq!(ha.len(), hb.len());
    for (ea, eb) in ha.iter().zip(hb) {
        for k in [
            "loss",
            "grad_norm",
            "learning_rate",
            "epoch",
            "num_tokens",
            "entropy",
            "mean_token_accuracy",
            "train_loss",
        ] {
            assert_eq!(
                numeric(ea, k),
                numeric(eb, k),
                "{name}: {k} differs at step {}",
                ea["step"]
            );
        }
    }
    for ((na, ta), (nb, tb)) in adapter(&straight).iter().zip(adapter(&crashed).iter()) {
        assert_eq!(na, nb);
        assert!(
            ta.equal(tb),
            "{name}: adapter tensor {na} differs after resume"
        );
    }
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&crashed);
}

#[test]
fn resume_after_crash_mid_run_is_exact() {
    resumed_equals_uninterrupted("midrun", "TRL_LIKE_CRASH_AFTER_STEP", "5");
}

#[test]
fn resume_after_crash_mid_save_is_exact() {
    resumed_equals_uninterrupted("midsave", "TRL_LIKE_CRASH_DURING_SAVE", "6");
}

#[test]
fn non_empty_output_dir_without_checkpoints_is_refused() {
    let out = tmp("nonempty");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let res = glm4(&sft_args(out.to_str().unwrap(), &["--max_steps", "1"]), &[]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("not empty") && err.contains("--overwrite_output_dir"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}

/// `glm4 preview --json` tokenizes like TRL 1.16, except that TRL prefixes the
/// already-templated text with `[gMASK]<sop>` a second time, which we don't.
#[test]
fn preview_matches_trl_tokenization() {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/trainer/dataset.json")).unwrap(),
    )
    .unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let file = case["data_file"].as_str().unwrap();
        let max_length = case["max_length"].to_string();
        let records = case["records"].as_array().unwrap();
        let n = records.len().to_string();
        let out = glm4(
            &[
                "preview",
                "--model_name_or_path",
                "weights/tiny-glm",
                "--data_files",
                file,
                "--max_length",
                &max_length,
                "--num_examples",
                &n,
                "--json",
            ],
            &[],
        );
        let text = ok(&out);
        let ours: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(ours.len(), records.len(), "{name}");
        for (i, (o, t)) in ours.iter().zip(records).enumerate() {
            let trl: Vec<i64> = serde_json::from_value(t["input_ids"].clone()).unwrap();
            let mine: Vec<i64> = serde_json::from_value(o["input_ids"].clone()).unwrap();
            assert_eq!(
                &trl[..2],
                &trl[2..4],
                "{name}[{i}]: TRL's double prefix is expected"
            );
            let trl_once = &trl[2..];
            let untruncated = t["untruncated_len"].as_u64().unwrap() as usize - 2;
            let max = case["max_length"].as_u64().unwrap() as usize;
            if untruncated <= max {
                assert_eq!(mine, trl_once, "{name}[{i}]");
            } else {
                // Both keep the start; our sequence has room for two more tokens.
                assert_eq!(mine.len(), max);
                assert_eq!(&mine[..trl_once.len()], trl_once, "{name}[{i}]");
            }
            assert_eq!(
                o["labels"], o["input_ids"],
                "{name}[{i}]: loss on every token, as TRL"
            );
            let trl_text = t["text"].as_str().unwrap();
            assert_eq!(
                o["text"].as_str().unwrap(),
                format!("{trl_text}<|endoftext|>"),
                "{name}[{i}]: text plus eos"
            );
        }
    }
}

/// `--use_peft false` trains every weight and saves a transformers checkpoint.
#[test]
fn full_fine_tuning_saves_a_transformers_checkpoint() {
    let out = tmp("fullft");
    let o = out.to_str().unwrap();
    ok(&glm4(
        &sft_args(
            o,
            &[
                "--use_peft",
                "false",
                "--max_steps",
                "2",
                "--save_strategy",
                "no",
                "--learning_rate",
                "1e-3",
                "--no_predict",
            ],
        ),
        &[],
    ));
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    assert!(!out.join("adapter_model.safetensors").exists());
    let trained = Tensor::read_safetensors(out.join("model.safetensors")).unwrap();
    let base: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(root().join("weights/tiny-glm/model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        trained.len(),
        base.len(),
        "every HF parameter is saved under its HF name"
    );
    let changed = trained.iter().filter(|(n, t)| !t.equal(&base[n])).count();
    assert!(
        changed > trained.len() / 2,
        "full fine-tuning must update the base weights ({changed} changed)"
    );
    let ours = glm4(
        &[
            "generate",
            "--model_name_or_path",
            o,
            "--prompt",
            "你好",
            "--max_new_tokens",
            "6",
            "--json",
        ],
        &[],
    );
    let ours: Value = serde_json::from_str(ok(&ours).trim()).unwrap();
    if let Some(py) = python() {
        let theirs = py_json(&py, &["hf", o, "你好", "6"]);
        assert_eq!(theirs["ids"], ours["generated_ids"]);
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// `load_best_model_at_end` ends with the weights of the best evaluation, which
/// rotation never deletes.
#[test]
fn load_best_model_at_end_keeps_and_restores_the_best_checkpoint() {
    let out = tmp("best");
    let o = out.to_str().unwrap();
    ok(&glm4(
        &sft_args(
            o,
            &[
                "--max_steps",
                "8",
                "--eval_strategy",
                "steps",
                "--eval_steps",
                "2",
                "--save_steps",
                "2",
                "--load_best_model_at_end",
                "true",
                "--save_total_limit",
                "1",
                "--learning_rate",
                "5e-2",
                "--no_predict",
            ],
        ),
        &[],
    ));
    let st = state(&out);
    let best = st["best_model_checkpoint"]
        .as_str()
        .expect("a best checkpoint is recorded");
    let evals: Vec<f64> = st["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["eval_loss"].as_f64())
        .collect();
    let min = evals.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(st["best_metric"].as_f64(), Some(min));
    assert!(
        Path::new(best).is_dir(),
        "rotation must keep the best checkpoint {best}"
    );
    for ((na, ta), (nb, tb)) in adapter(&out).iter().zip(adapter(Path::new(best)).iter()) {
        assert_eq!(na, nb);
        assert!(
            ta.equal(tb),
            "the final adapter must be the best checkpoint's"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// A bad record stops training with its file, index and field; `--skip_bad_records` leaves it out and counts it.
#[test]
fn bad_records_fail_clearly_or_are_skipped_and_counted() {
    let dir = tmp("baddata");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.json");
    let mut records: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("data/demo_alpaca.json")).unwrap(),
    )
    .unwrap();
    records[3].as_object_mut().unwrap().remove("output");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let out = dir.join("out");
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = sft_args(
        o,
        &["--max_steps", "1", "--no_predict", "--save_strategy", "no"],
    );
    let pos = args
        .iter()
        .position(|a| *a == "data/demo_alpaca.json")
        .unwrap();
    args[pos] = d;
    let res = glm4(&args, &[]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("data.json record 3") && err.contains("\"output\""),
        "{err}"
    );
    args.extend_from_slice(&["--skip_bad_records", "true"]);
    let res = glm4(&args, &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.contains("skipped 1 of 80 records"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Human-readable preview: text, token counts, and a length summary.
#[test]
fn preview_shows_text_tokens_and_statistics() {
    let out = ok(&glm4(
        &[
            "preview",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--data_files",
            "data/demo_alpaca.json",
            "--num_examples",
            "2",
        ],
        &[],
    ));
    assert!(out.contains("dataset format: alpaca"), "{out}");
    assert!(
        out.contains("record 0:") && out.contains("record 1:") && !out.contains("record 2:"),
        "{out}"
    );
    assert!(
        out.contains("<|user|>\n你好，告诉我你的名字。<|assistant|>"),
        "{out}"
    );
    assert!(out.contains("80 records; tokens min"), "{out}");
}

/// Ctrl-C (SIGINT) or SIGTERM: the step finishes, a checkpoint is written, the
/// process exits 0 saying how to resume, and resuming works.
#[test]
fn interrupt_saves_a_checkpoint_and_exits_cleanly() {
    for signal in ["-INT", "-TERM"] {
        let out = tmp(&format!("interrupt{signal}"));
        let o = out.to_str().unwrap();
        let args = sft_args(
            o,
            &[
                "--max_steps",
                "100000",
                "--save_steps",
                "1000000",
                "--no_predict",
                "--logging_steps",
                "50",
            ],
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
            .args(&args)
            .current_dir(root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Interrupt once training has started (a fixed sleep raced the model
        // load on a busy machine: a signal before training exits 130 at once).
        let (wait_start, reader) = common::watch_stderr(&mut child, "Running training");
        wait_start
            .recv_timeout(std::time::Duration::from_secs(300))
            .expect("training starts");
        std::thread::sleep(std::time::Duration::from_millis(500));
        Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        let err = reader.join().unwrap();
        let res = std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: err.clone().into_bytes(),
        };
        assert!(res.status.success(), "{signal}: {err}");
        assert!(
            err.contains("interrupted: stopped after step") && err.contains("resume"),
            "{err}"
        );
        let ckpts = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
            .count();
        assert_eq!(ckpts, 1, "{signal}: one checkpoint at the interrupted step");
        assert!(
            !out.join("trainer_state.json").exists(),
            "an interrupted run must not look finished"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// A NaN loss skips that update (the weights stay finite); NaNs in a row stop the run with a clear error.
#[test]
fn nonfinite_steps_are_skipped_then_stop_the_run() {
    let out = tmp("nan");
    let o = out.to_str().unwrap();
    let res = glm4(
        &sft_args(
            o,
            &["--max_steps", "4", "--no_predict", "--save_strategy", "no"],
        ),
        &[("TRL_LIKE_NAN_AT_STEP", "2")],
    );
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    ok(&res);
    assert!(
        err.contains("step 2: loss NaN") && err.contains("update is skipped"),
        "{err}"
    );
    for (name, t) in adapter(&out) {
        assert!(
            t.isfinite().all().int64_value(&[]) == 1,
            "{name} is not finite"
        );
    }
    let logged: Vec<f64> = state(&out)["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["loss"].as_f64())
        .collect();
    assert_eq!(logged.len(), 4);
    assert!(
        logged.iter().all(|l| l.is_finite()),
        "NaN losses stay out of the logs: {logged:?}"
    );

    let out2 = tmp("nan-stop");
    let res = glm4(
        &sft_args(
            out2.to_str().unwrap(),
            &["--max_steps", "10", "--no_predict", "--save_strategy", "no"],
        ),
        &[("TRL_LIKE_NAN_AT_STEP", "2,3,4,5,6")],
    );
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains("5 optimizer steps in a row had a NaN/inf loss"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out2);
}

/// A write error while saving a checkpoint (here the temporary checkpoint path is
/// taken by a file) stops the run with an error naming the path, and the earlier
/// checkpoint stays intact and resumable.
#[test]
fn write_error_during_save_keeps_earlier_checkpoints() {
    let out = tmp("writeerr");
    let o = out.to_str().unwrap();
    let extra = ["--save_steps", "1", "--no_predict"];
    let mut first: Vec<&str> = sft_args(o, &extra);
    first.extend_from_slice(&["--max_steps", "1"]);
    ok(&glm4(&first, &[]));
    let before = adapter(&out.join("checkpoint-1"));
    std::fs::write(out.join(".checkpoint-2.partial"), "in the way").unwrap();
    let mut second: Vec<&str> = sft_args(o, &extra);
    second.extend_from_slice(&["--max_steps", "3"]);
    let res = glm4(&second, &[]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.contains(".checkpoint-2.partial") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        out.join("checkpoint-1/trainer_state.json").is_file(),
        "the earlier checkpoint must survive"
    );
    for ((na, ta), (nb, tb)) in before.iter().zip(adapter(&out.join("checkpoint-1")).iter()) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "checkpoint-1 changed");
    }
    // Once the obstacle is gone, the same command resumes from checkpoint-1 and finishes.
    std::fs::remove_file(out.join(".checkpoint-2.partial")).unwrap();
    let res = glm4(&second, &[]);
    let log = String::from_utf8_lossy(&res.stderr).into_owned();
    ok(&res);
    assert!(
        log.contains("resuming from") && log.contains("checkpoint-1"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
