//! Nothing lost, nothing silent (issue 17, items 1-6): `merge` never writes
//! over its inputs or leaves stale shards, one run per output_dir at a time,
//! Ctrl-C always leaves something resumable, `--overwrite_output_dir` really
//! starts over, final files are replaced atomically, and a resume refuses
//! settings that would make it a different run.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn glm4(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glm4"));
    cmd.args(args).current_dir(root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("glm4 runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    let err = stderr(o);
    assert!(o.status.success(), "glm4 failed:\n{err}");
    err
}

fn failed(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected a clean failure:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("glm4-safety-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

/// A short LoRA run of the tiny model into `out`.
fn sft(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "sft",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        "data/demo_alpaca.json",
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
        "--no_predict",
        "--bf16",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("--output_dir".into());
    v.push(out.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn state(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Starts a long run and returns once its first log line is out (the trainer
/// is stepping and the Ctrl-C handler is in place), with the rest of its
/// stderr collected by a thread.
fn start_long_run(out: &Path, extra: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let mut args = sft(out, &["--max_steps", "100000"]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(&args)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("{'loss'") {
            break;
        }
    }
    assert!(
        seen.contains("{'loss'"),
        "the run never logged a step:\n{seen}"
    );
    let rest = std::thread::spawn(move || {
        for line in lines {
            seen.push_str(&line.unwrap_or_default());
            seen.push('\n');
        }
        seen
    });
    (child, rest)
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
}

/// Item 1: with --overwrite_output_dir, a folder holding an older *sharded*
/// model gets the merged single file and nothing of the old model survives
/// (before, the stale index made `generate` load the old shards).
#[test]
fn merge_over_an_older_sharded_model_leaves_no_stale_shards() {
    let dir = tmp("merge-stale");
    let out = dir.join("merged");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        std::fs::write(out.join(f), "old shard").unwrap();
    }
    std::fs::write(out.join("README.md"), "the user's notes").unwrap();
    let args: Vec<String> = [
        "merge",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--adapter_path",
        "tests/fixtures/trainer/peft_adapter",
        "--output_dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let err = failed(&glm4(&args, &[]));
    assert!(err.contains("not empty"), "{err}");
    assert!(
        out.join("model.safetensors.index.json").exists(),
        "refused means untouched"
    );

    let mut over = args.clone();
    over.push("--overwrite_output_dir".into());
    ok(&glm4(&over, &[]));
    let left = names(&out);
    assert!(
        !left
            .iter()
            .any(|n| n.starts_with("model-") || n.ends_with(".index.json") || n.contains(".tmp-")),
        "stale shards or index left: {left:?}"
    );
    assert!(left.contains(&"model.safetensors".to_string()), "{left:?}");
    assert!(
        left.contains(&"README.md".to_string()),
        "other files stay: {left:?}"
    );
    let gen: Vec<String> = [
        "generate",
        "--model_name_or_path",
        out.to_str().unwrap(),
        "--prompt",
        "你好",
        "--max_new_tokens",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ok(&glm4(&gen, &[]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 2: a second run on a busy output_dir is refused naming the first;
/// the lock goes with its process, also when it dies without cleaning up.
#[test]
fn a_second_run_on_a_busy_output_dir_is_refused() {
    let out = tmp("lock");
    let (child, rest) = start_long_run(&out, &["--save_steps", "1000000"]);
    let second = glm4(&sft(&out, &["--max_steps", "1"]), &[]);
    let err = failed(&second);
    assert!(
        err.contains("in use by another run") && err.contains(&format!("pid {}", child.id())),
        "{err}"
    );
    signal(&child, "-INT");
    let mut child = child;
    assert!(child.wait().unwrap().success(), "{}", rest.join().unwrap());
    let _ = rest.join();
    assert!(
        !out.join(".output_dir.lock").exists(),
        "the lock file goes with the run"
    );

    // A run that dies (abort: no destructors) leaves a stale lock file whose
    // lock the kernel has released: the next run takes it over and resumes.
    let out2 = tmp("lock-stale");
    let crashed = glm4(
        &sft(&out2, &["--max_steps", "3", "--save_steps", "1"]),
        &[("TRL_LIKE_CRASH_AFTER_STEP", "1")],
    );
    assert!(!crashed.status.success());
    assert!(
        out2.join(".output_dir.lock").exists(),
        "abort leaves the file"
    );
    let log = ok(&glm4(
        &sft(&out2, &["--max_steps", "3", "--save_steps", "1"]),
        &[],
    ));
    assert!(log.contains("resuming from"), "{log}");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&out2);
}

/// Item 3: Ctrl-C under `--save_strategy no` and under `--save_only_model`
/// still writes a checkpoint with its optimizer, says so, and the rerun
/// resumes from it (before: nothing saved / resume refused).
#[test]
fn ctrl_c_always_leaves_a_resumable_checkpoint() {
    for (name, flags) in [
        ("nosave", &["--save_strategy", "no"][..]),
        (
            "onlymodel",
            &["--save_only_model", "true", "--save_steps", "1000000"][..],
        ),
    ] {
        let out = tmp(&format!("ctrlc-{name}"));
        let (mut child, rest) = start_long_run(&out, flags);
        signal(&child, "-INT");
        let status = child.wait().unwrap();
        let err = rest.join().unwrap();
        assert!(status.success(), "{name}: {err}");
        let ckpt = names(&out)
            .into_iter()
            .find(|n| n.starts_with("checkpoint-"))
            .unwrap_or_else(|| panic!("{name}: no checkpoint written:\n{err}"));
        let step: usize = ckpt["checkpoint-".len()..].parse().unwrap();
        assert!(
            out.join(&ckpt).join("optimizer.safetensors").is_file(),
            "{name}: the interrupt checkpoint must hold the optimizer"
        );
        assert!(
            err.contains(&format!("the checkpoint is {}", out.join(&ckpt).display()))
                && err.contains("Run the same command again to resume"),
            "{name}: {err}"
        );
        let mut again = sft(&out, &["--max_steps", &(step + 1).to_string()]);
        again.extend(flags.iter().map(|s| s.to_string()));
        let log = ok(&glm4(&again, &[]));
        assert!(
            log.contains(&format!("resuming from {}", out.join(&ckpt).display())),
            "{name}: {log}"
        );
        assert_eq!(
            state(&out.join("trainer_state.json"))["global_step"],
            step + 1
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// Item 4: --overwrite_output_dir removes the previous run's checkpoints and
/// final files (not the user's), so a later plain rerun cannot "resume" from
/// the old run's checkpoint.
#[test]
fn overwrite_removes_the_previous_runs_checkpoints() {
    let out = tmp("overwrite");
    ok(&glm4(
        &sft(&out, &["--max_steps", "3", "--save_steps", "3"]),
        &[],
    ));
    assert!(out.join("checkpoint-3").is_dir());
    std::fs::write(out.join("notes.txt"), "mine").unwrap();

    let short = ["--max_steps", "1", "--save_steps", "1"];
    let mut over = sft(&out, &short);
    over.push("--overwrite_output_dir".into());
    let log = ok(&glm4(&over, &[]));
    assert!(log.contains("removed the previous run's"), "{log}");
    assert!(
        !out.join("checkpoint-3").exists(),
        "the old run's checkpoint survived"
    );
    assert!(out.join("checkpoint-1").is_dir());
    assert!(out.join("notes.txt").is_file(), "the user's file stays");

    // A plain rerun continues this run (checkpoint-1), not the old one.
    let log = ok(&glm4(
        &sft(&out, &["--max_steps", "2", "--save_steps", "1"]),
        &[],
    ));
    assert!(
        log.contains(&format!(
            "resuming from {}",
            out.join("checkpoint-1").display()
        )),
        "{log}"
    );
    assert_eq!(state(&out.join("trainer_state.json"))["global_step"], 2);
    let _ = std::fs::remove_dir_all(&out);
}

/// Item 5: a write that fails half-way (injected ENOSPC) leaves the previous
/// final adapter / tokenizer.json untouched and no partial file behind.
#[test]
fn a_failed_final_write_keeps_the_previous_file() {
    let out = tmp("atomic");
    ok(&glm4(
        &sft(&out, &["--max_steps", "1", "--save_steps", "1"]),
        &[],
    ));
    for file in ["adapter_model.safetensors", "tokenizer.json"] {
        let before = std::fs::read(out.join(file)).unwrap();
        let target = out.join(file);
        let res = glm4(
            &sft(&out, &["--max_steps", "2", "--save_steps", "1"]),
            &[("TRL_LIKE_FAIL_WRITE", target.to_str().unwrap())],
        );
        let err = failed(&res);
        assert!(
            err.contains("no space left on device") && err.contains(file),
            "{err}"
        );
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            before,
            "{file} changed although its write failed"
        );
        let left = names(&out);
        assert!(
            !left.iter().any(|n| n.contains(".tmp-")),
            "{file}: a temporary file was left: {left:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Item 6: what only changes the future is a warning; a changed batch
/// geometry is refused unless --ignore_data_skip, which also restarts the
/// epoch's data instead of skipping it; checkpoints without the record still
/// resume, with a note.
#[test]
fn resume_warns_or_refuses_changed_settings() {
    let out = tmp("resume");
    ok(&glm4(
        &sft(&out, &["--max_steps", "1", "--save_steps", "1"]),
        &[],
    ));
    let ckpt = out.join("checkpoint-1");
    assert!(ckpt.join("run_record.json").is_file());
    // Resumed runs save nothing, so every one of them resumes from checkpoint-1.
    let resumed = |extra: &[&str]| {
        let mut v = sft(&out, &["--max_steps", "2", "--save_strategy", "no"]);
        v.extend(extra.iter().map(|s| s.to_string()));
        glm4(&v, &[])
    };

    let log = ok(&resumed(&["--learning_rate", "1e-3"]));
    assert!(
        log.contains("learning_rate 0.005 -> 0.001") && log.contains("max_steps 1 -> 2"),
        "{log}"
    );

    let bigger = ["--per_device_train_batch_size", "8"];
    let err = failed(&resumed(&bigger));
    assert!(
        err.contains("cannot resume from") && err.contains("--ignore_data_skip"),
        "{err}"
    );
    let log = ok(&resumed(
        &[&bigger[..], &["--ignore_data_skip", "true"]].concat(),
    ));
    assert!(log.contains("ignore_data_skip: resuming anyway"), "{log}");

    // ignore_data_skip trains the epoch from its first batch again: step 2 has
    // the epoch fraction of step 1 (skipping would give twice that).
    ok(&resumed(&["--ignore_data_skip", "true"]));
    let hist = state(&out.join("trainer_state.json"))["log_history"].clone();
    let epochs: Vec<f64> = hist
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("loss").is_some())
        .map(|e| e["epoch"].as_f64().unwrap())
        .collect();
    assert_eq!(epochs.len(), 2, "{hist}");
    assert_eq!(epochs[0], epochs[1], "{hist}");

    // A checkpoint written before the record existed resumes with a note.
    std::fs::remove_file(ckpt.join("run_record.json")).unwrap();
    let log = ok(&resumed(&[]));
    assert!(log.contains("has no run_record.json"), "{log}");
    let _ = std::fs::remove_dir_all(&out);
}
