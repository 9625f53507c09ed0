//! `--deepspeed` (issue 15): ZeRO-1/2 over Gloo ranks launched by torchrun
//! computes what plain DDP and one process with the union batch compute
//! (loss, grad_norm, lr of every step, final weights), reports its per-rank
//! optimizer memory by the ZeRO formula, and resumes its sharded optimizer
//! state with another world size.

mod common;

use common::launch::{free_port, log_history, ok, per_step, root, single, tmp, under_torchrun};
use std::path::Path;
use std::process::Command;
use tch::Tensor;

/// DeepSpeed JSON configs with "auto" values (fp32 with --bf16 false).
fn ds_config(stage: u8) -> String {
    root()
        .join(format!("tests/fixtures/deepspeed/ds_zero{stage}.json"))
        .display()
        .to_string()
}

/// The tutorial's accelerate config (bf16 mixed precision, ZeRO-2).
fn accelerate_zero2() -> String {
    root()
        .join("tests/fixtures/deepspeed/accelerate_zero2.yaml")
        .display()
        .to_string()
}

/// A short fp32 run of the tiny model (dropout 0).
fn sft_args(out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "sft",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        "data/demo_alpaca.json",
        "--max_length",
        "64",
        "--lora_dropout",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--disable_tqdm",
        "true",
        "--no_predict",
        "--bf16",
        "false",
        "--ddp_timeout",
        "60",
        "--max_steps",
        "4",
        "--weight_decay",
        "0.01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("--output_dir".into());
    v.push(out.display().to_string());
    v.push("--per_device_train_batch_size".into());
    v.push(batch.to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(world: usize, args: &[String], what: &str) -> String {
    if world == 1 {
        ok(&single(args), what)
    } else {
        ok(&under_torchrun(world, args), what)
    }
}

fn weights(dir: &Path, lora: bool) -> Vec<(String, Tensor)> {
    let file = if lora {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    };
    let mut v = Tensor::read_safetensors(dir.join(file)).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{what}: {a:?} vs {b:?}");
    }
}

fn assert_same_run(reference: &Path, other: &Path, lora: bool, what: &str) {
    let (h1, h2) = (log_history(reference), log_history(other));
    for key in ["loss", "grad_norm", "learning_rate"] {
        let (a, b) = (per_step(&h1, key), per_step(&h2, key));
        assert_eq!(a.len(), 4, "{what}: {key}");
        assert_close(&a, &b, &format!("{what}: {key}"));
    }
    let (w1, w2) = (weights(reference, lora), weights(other, lora));
    assert_eq!(w1.len(), w2.len());
    if !lora {
        // The tolerance below is meaningful: training moved the weights further.
        let base = weights(&root().join("weights/tiny-glm"), false);
        let moved = w1
            .iter()
            .zip(&base)
            .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(moved > 2e-5, "{what}: the weights moved only {moved}");
    }
    for ((na, ta), (nb, tb)) in w1.iter().zip(&w2) {
        assert_eq!(na, nb);
        let diff = (ta - tb).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{what}: {na} differs by {diff}");
    }
}

/// The number after `key` in the log (e.g. "optimizer state 123 bytes").
fn number_after(log: &str, key: &str) -> i64 {
    let at = log
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in:\n{log}"))
        + key.len();
    log[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One process with batch 6 ≡ DDP 2 × 3 ≡ ZeRO-1 2 × 3 ≡ ZeRO-2 3 × 2 (the
/// LoRA run's 10,240 values over 3 ranks leave the last shard short: 3,414,
/// 3,414, 3,412).
fn check_stages(name: &str, lora: bool) {
    let peft: &[&str] = if lora {
        &["--learning_rate", "5e-3"]
    } else {
        // Parameters whose gradient is pure rounding noise (the key biases:
        // softmax ignores them) move by ±lr under Adam whatever the noise, so
        // the weights of any two summation orders differ by up to ~lr: a
        // small lr keeps that below the 1e-5 tolerance (and assert_same_run
        // checks the weights moved by more than it).
        &["--use_peft", "false", "--learning_rate", "1e-5"]
    };
    let base = |out: &Path, batch: usize, ds: Option<u8>| {
        let mut extra: Vec<String> = peft.iter().map(|s| s.to_string()).collect();
        extra.extend(["--save_strategy".to_string(), "no".to_string()]);
        if let Some(stage) = ds {
            extra.extend(["--deepspeed".to_string(), ds_config(stage)]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        sft_args(out, batch, &extra)
    };
    let one = tmp("zero", &format!("{name}-one"));
    run(1, &base(&one, 6, None), "single process");
    let ddp = tmp("zero", &format!("{name}-ddp"));
    run(2, &base(&ddp, 3, None), "ddp");
    assert_same_run(&one, &ddp, lora, &format!("{name}: ddp"));
    // Stage 0 (replicated fp32 masters and moments) only for LoRA: the
    // full fine-tune repeats nothing stage 0 does differently.
    let stages: &[(usize, usize, u8)] = if lora {
        &[(2, 3, 0), (2, 3, 1), (3, 2, 2)]
    } else {
        &[(2, 3, 1), (3, 2, 2)]
    };
    for &(world, batch, stage) in stages {
        let out = tmp("zero", &format!("{name}-z{stage}-w{world}"));
        let log = run(world, &base(&out, batch, Some(stage)), "zero");
        let what = format!("{name}: ZeRO-{stage} on {world} ranks");
        assert!(
            log.contains(&format!(
                "data parallel: all {world} ranks hold bit-identical trainable weights"
            )),
            "{what}: {log}"
        );
        assert_same_run(&one, &out, lora, &what);
        assert!(
            log.contains("memory estimate (glm4 estimate-memory)"),
            "{what}: {log}"
        );
        // The per-rank optimizer state is the ZeRO formula: 12 bytes per value of a shard.
        let psi = number_after(&log, "trainable params:");
        let ds_line = log
            .lines()
            .find(|l| l.contains("deepspeed: ZeRO stage"))
            .unwrap_or_else(|| panic!("{what}: no deepspeed line in {log}"));
        let shards = if stage == 0 { 1 } else { world as i64 };
        let shard = (psi + shards - 1) / shards;
        assert_eq!(
            number_after(ds_line, "optimizer state"),
            12 * shard,
            "{what}"
        );
        let grads = if stage == 2 { shard } else { psi };
        assert_eq!(number_after(ds_line, "fp32 gradient"), 4 * grads, "{what}");
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&one);
    let _ = std::fs::remove_dir_all(&ddp);
}

#[test]
fn lora_zero_stages_equal_ddp_and_one_process() {
    check_stages("lora", true);
}

#[test]
fn full_fine_tuning_zero_stages_equal_ddp_and_one_process() {
    check_stages("full", false);
}

/// A checkpoint of `from` ranks resumed on `to` ranks finishes with the
/// losses and weights of the uninterrupted run (`zero`: whether each side
/// runs ZeRO-2; a plain AdamW state converts either way).
fn check_resume(from: usize, to: usize, zero: (bool, bool)) {
    let name = format!("resume-{from}-{to}-{}-{}", zero.0, zero.1);
    let args = |out: &Path, world: usize, ds: bool, extra: &[&str]| {
        let mut e = vec![
            "--use_peft",
            "false",
            "--learning_rate",
            "1e-5",
            "--save_steps",
            "2",
        ];
        let config = ds_config(2);
        if ds {
            e.extend_from_slice(&["--deepspeed", &config]);
        }
        e.extend_from_slice(extra);
        sft_args(out, 6 / world, &e)
    };
    let full = tmp("zero", &format!("{name}-full"));
    run(from, &args(&full, from, zero.0, &[]), "uninterrupted run");
    let ckpt = full.join("checkpoint-2");
    let files: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("zero_optim_shard_"))
        .collect();
    let shards = if zero.0 { from } else { 0 };
    assert_eq!(
        files.len(),
        shards,
        "one optimizer shard per rank: {files:?}"
    );
    let resumed = tmp("zero", &format!("{name}-resumed"));
    let ckpt_arg = ckpt.display().to_string();
    let log = run(
        to,
        &args(
            &resumed,
            to,
            zero.1,
            &["--resume_from_checkpoint", &ckpt_arg],
        ),
        "resume",
    );
    assert!(log.contains("resuming from"), "{log}");
    if zero.0 != zero.1 {
        assert!(
            log.contains("continuing a"),
            "{name}: no conversion in {log}"
        );
    }
    assert_same_run(&full, &resumed, false, &name);
    let _ = std::fs::remove_dir_all(&full);
    let _ = std::fs::remove_dir_all(&resumed);
}

#[test]
fn zero2_checkpoint_of_two_ranks_resumes_in_one_process() {
    check_resume(2, 1, (true, true));
}

#[test]
fn zero2_checkpoint_of_one_process_resumes_on_three_ranks() {
    check_resume(1, 3, (true, true));
}

#[test]
fn plain_adamw_checkpoint_continues_under_zero2() {
    check_resume(1, 2, (false, true));
}

#[test]
fn zero2_checkpoint_continues_without_deepspeed() {
    check_resume(2, 1, (true, false));
}

#[test]
fn bad_deepspeed_configs_are_refused_before_training() {
    let dir = tmp("zero", "bad");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            r#"{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}"#,
            "offload_optimizer.device",
        ),
        (r#"{"zero_optimization": {"stage": 3}}"#, "stage 3"),
        (
            r#"{"train_micro_batch_size_per_gpu": 8}"#,
            "train_micro_batch_size_per_gpu = 8 vs --per_device_train_batch_size 2",
        ),
    ];
    for (i, (text, expected)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("ds{i}.json"));
        std::fs::write(&file, text).unwrap();
        let out = dir.join(format!("out{i}"));
        let f = file.display().to_string();
        let o = single(&sft_args(&out, 2, &["--deepspeed", &f]));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text} should fail");
        assert!(err.contains(expected) && err.contains(&f), "{text}: {err}");
        assert!(!out.join("trainer_state.json").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The number before `unit` on the line starting with `label`.
fn figure(text: &str, label: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn estimate_memory_of_glm4_9b_full_fine_tuning_is_deepspeeds_formula() {
    let out = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "estimate-memory",
            "--model_config",
            "glm-4-9b",
            "--use_peft",
            "false",
            "--zero_stage",
            "2",
            "--world_size",
            "8",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let psi: f64 = text.split_whitespace().next().unwrap().parse().unwrap();
    assert!((9.3e9..9.5e9).contains(&psi), "{text}");
    let states = figure(&text, "model states");
    // DeepSpeed's estimate_zero2_model_states_mem_needs: 2Ψ + 14Ψ/N bytes.
    let formula = (2.0 * psi + 14.0 * psi / 8.0) / 1e9;
    assert!((states - formula).abs() < 0.01, "{states} vs {formula}");
    assert!((34.0..36.5).contains(&states), "{text}");
    // Plain DDP needs 16Ψ.
    let ddp = text
        .split("stage 0 ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap();
    assert!((ddp - 16.0 * psi / 1e9).abs() < 0.01, "{text}");
    for (label, value) in [
        ("weights (16-bit)", 2.0 * psi),
        ("gradients (16-bit)", 2.0 * psi / 8.0),
        ("fp32 master weights", 4.0 * psi / 8.0),
        ("AdamW moments (fp32)", 8.0 * psi / 8.0),
    ] {
        assert!(
            (figure(&text, label) - value / 1e9).abs() < 0.01,
            "{label}: {text}"
        );
    }
    // A bad stage is refused clearly.
    let bad = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "estimate-memory",
            "--model_config",
            "glm-4-9b",
            "--zero_stage",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--zero_stage 3"));
}

/// DeepSpeed's bf16 mode (the tutorial's accelerate config): bf16 working
/// weights, fp32 masters and moments, fp32 gradient reduction. Full
/// fine-tuning on two ZeRO-2 ranks against one process that also keeps fp32
/// masters, at the tutorial's full fine-tuning rate 5e-5: most single updates
/// are below half a bf16 ulp of their weight (pure bf16 AdamW would drop
/// them; optim::zero's unit test shows that), yet the bf16 weights move.
#[test]
fn bf16_zero2_ranks_equal_one_bf16_process_with_master_weights() {
    let acc = accelerate_zero2();
    let args = |out: &Path, batch: usize| {
        let mut v = sft_args(
            out,
            batch,
            &[
                "--use_peft",
                "false",
                "--learning_rate",
                "5e-5",
                "--save_strategy",
                "no",
                "--deepspeed",
                &acc,
            ],
        );
        let at = v.iter().position(|w| w == "--bf16").unwrap();
        v[at + 1] = "true".into();
        v
    };
    let one = tmp("zero", "bf16-one");
    let log = run(1, &args(&one, 4), "bf16 single process");
    assert!(log.contains("bf16 true"), "{log}");
    let ranks = tmp("zero", "bf16-ranks");
    let log = run(2, &args(&ranks, 2), "bf16 ranks");
    assert!(
        log.contains("data parallel: all 2 ranks hold bit-identical trainable weights"),
        "{log}"
    );
    let (h1, h2) = (log_history(&one), log_history(&ranks));
    // The ranks pad their halves of the batch to other lengths than the one
    // process does, so bf16 activations round differently: agreement is to
    // bf16 resolution, not 1e-5.
    for (key, tol) in [
        ("loss", 1e-2),
        ("grad_norm", 2e-2),
        ("learning_rate", 1e-12),
    ] {
        let (a, b) = (per_step(&h1, key), per_step(&h2, key));
        assert_eq!(a.len(), 4, "{key}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= tol * x.abs().max(1.0),
                "{key}: {a:?} vs {b:?}"
            );
        }
    }
    let base = weights(&root().join("weights/tiny-glm"), false);
    for dir in [&one, &ranks] {
        let trained = weights(dir, false);
        let (mut changed, mut total) = (0i64, 0i64);
        for ((name, t), (_, b)) in trained.iter().zip(&base) {
            assert_eq!(
                t.kind(),
                tch::Kind::BFloat16,
                "{name} is saved as the bf16 working weight"
            );
            changed += t
                .ne_tensor(&b.to_kind(tch::Kind::BFloat16))
                .sum(tch::Kind::Int64)
                .int64_value(&[]);
            total += t.numel() as i64;
        }
        let share = changed as f64 / total as f64;
        eprintln!("{}: {share:.3} of the bf16 weights changed", dir.display());
        assert!(share > 0.1, "only {share} of the bf16 weights moved");
    }
    let _ = std::fs::remove_dir_all(&one);
    let _ = std::fs::remove_dir_all(&ranks);
}

/// Under ZeRO-2 a rank that dies makes the other fail with an error naming
/// the collective and its rank instead of hanging.
#[test]
fn a_dead_zero_rank_stops_the_other_with_a_clear_error() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let out = tmp("zero", "dead");
    let ds = ds_config(2);
    let args = sft_args(
        &out,
        2,
        &["--deepspeed", &ds, "--save_steps", "2", "--max_steps", "6"],
    );
    let port = free_port().to_string();
    let spawn = |rank: usize, crash: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_glm4"));
        cmd.args(&args)
            .current_dir(root())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("LOCAL_WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env_remove("TORCHELASTIC_USE_AGENT_STORE")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if crash {
            cmd.env("TRL_LIKE_CRASH_AFTER_STEP", "3");
        }
        cmd.spawn().unwrap()
    };
    let (mut r0, mut r1) = (spawn(0, false), spawn(1, true));
    let start = Instant::now();
    let wait = |child: &mut std::process::Child| loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            panic!("a rank still runs after 180 s: it hangs");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!wait(&mut r1), "rank 1 was meant to crash");
    assert!(!wait(&mut r0), "rank 0 must fail when its peer is gone");
    let mut err = String::new();
    use std::io::Read;
    r0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("distributed") && err.contains("rank 0 of 2"),
        "the error names the failed collective and the rank:\n{err}"
    );
    // The checkpoint of step 2 is complete: both shards and the layout.
    let ckpt = out.join("checkpoint-2");
    for f in [
        "zero_optimizer.json",
        "zero_optim_shard_00000_of_00002.safetensors",
        "zero_optim_shard_00001_of_00002.safetensors",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    let _ = std::fs::remove_dir_all(&out);
}
