//! `glm4 bench` end to end on the embedded tiny model: a couple of CPU steps
//! give a JSON report with positive throughput and memory, and bad input gets a
//! clear error. (Throughput itself is measured by `make bench`, not asserted.)

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

fn glm4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glm4"))
        .arg("bench")
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("glm4 runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn tiny_random_init_reports_json() {
    let out = glm4(&[
        "--model_config",
        "tiny",
        "--random_init",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch_size",
        "2",
        "--seq_len",
        "32",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // stdout is exactly one JSON object (the trainer's own messages go to stderr).
    let r: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"));
    let num = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    assert!(num("tokens_per_second") > 0.0, "{r}");
    assert!(num("peak_rss_mb") > 0.0, "{r}");
    assert!(num("seconds_per_step") > 0.0, "{r}");
    assert_eq!(r["measured_steps"], 2);
    // 2 steps x 2 sequences x 32 synthetic tokens, no padding.
    assert_eq!(r["measured_tokens"], 128);
    assert_eq!(r["num_parameters"], 820_352);
    // LoRA r 8 on q/k/v of 2 layers: (8·128 + 128·8) + 2·(8·128 + 64·8), per layer.
    assert_eq!(r["trainable_parameters"], 2 * (2048 + 2 * 1536));
    assert!(r["train_loss"].as_f64().is_some_and(f64::is_finite), "{r}");
    assert!(
        r["mfu"].is_null(),
        "no MFU on CPU without --peak_tflops: {r}"
    );
    // The CUDA allocator peaks are reported as absent on CPU, not as zero.
    for k in [
        "cuda_max_memory_allocated_mb",
        "cuda_max_memory_reserved_mb",
    ] {
        assert!(r.get(k).is_some_and(Value::is_null), "{k} on CPU: {r}");
    }
}

/// Padded, padding-free and packed runs over the same records: the same real
/// tokens per step for padded and padding-free (the same batches, without the
/// padding), and the report says which layout ran.
#[test]
fn padding_free_and_packing_report_their_layout() {
    let run = |extra: &[&str]| -> Value {
        let mut a = vec![
            "--model_config",
            "tiny",
            "--random_init",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch_size",
            "4",
            "--seq_len",
            "64",
            "--device",
            "cpu",
            "--data",
            "data/demo_alpaca.json",
            "--num_records",
            "16",
            "--json",
        ];
        a.extend_from_slice(extra);
        let out = glm4(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_str(text(&out.stdout).trim()).unwrap()
    };
    let padded = run(&[]);
    let free = run(&["--padding_free", "true"]);
    let packed = run(&["--packing", "true"]);
    assert_eq!(padded["padding_free"], false);
    assert!(
        padded["padding_fraction"].as_f64().unwrap() > 0.05,
        "{padded}"
    );
    assert_eq!(free["padding_free"], true);
    assert_eq!(free["padding_fraction"].as_f64(), Some(0.0));
    assert_eq!(free["measured_tokens"], padded["measured_tokens"]);
    assert_eq!(free["dataset_tokens"], padded["dataset_tokens"]);
    // bfd packing implies padding-free batches of 64-token blocks.
    assert_eq!(packed["packing_strategy"], "bfd");
    assert_eq!(packed["padding_free"], true);
    assert!(packed["num_records"].as_u64().unwrap() < 16, "{packed}");
    assert_eq!(packed["dataset_tokens"], padded["dataset_tokens"]);
}

#[test]
fn bad_preset_is_a_clear_error() {
    let out = glm4(&["--model_config", "glm-5-huge", "--random_init"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("glm-5-huge") && err.contains("glm-4-9b, small, tiny"),
        "{err}"
    );
}

#[test]
fn unknown_option_and_missing_weights_are_errors() {
    let out = glm4(&["--model_config", "tiny", "--stepz", "2"]);
    assert!(!out.status.success());
    // clap's wording, with its suggestion.
    let err = text(&out.stderr);
    assert!(
        err.contains("unexpected argument '--stepz'") && err.contains("'--steps'"),
        "{err}"
    );
    // The 9B shape has no weights here: benchmarking it needs --random_init, said before any allocation.
    let out = glm4(&["--model_config", "glm-4-9b", "--device", "cpu"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--random_init"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_lists_the_options() {
    let out = glm4(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in [
        "--model_config",
        "--random_init",
        "--gradient_checkpointing",
        "--json",
        "--dump_dataset",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

/// `--random_init` draws the same weights in every process for the same seed
/// (the bench compares runs made in separate processes), and a padded and a
/// padding-free run of the same records then start from the same loss.
#[test]
fn random_init_is_reproducible_and_layouts_agree() {
    let loss = |padding_free: &str| {
        let out = glm4(&[
            "--model_config",
            "tiny",
            "--random_init",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--batch_size",
            "4",
            "--seq_len",
            "64",
            "--lora_dropout",
            "0",
            "--data",
            "data/demo_alpaca.json",
            "--num_records",
            "4",
            "--padding_free",
            padding_free,
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let r: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        r["train_loss"].as_f64().unwrap()
    };
    let (a, b) = (loss("false"), loss("false"));
    assert_eq!(a, b, "two processes, same seed, different weights");
    let c = loss("true");
    assert!((a - c).abs() < 1e-5, "padded {a} vs padding-free {c}");
}

/// The default (padded batches computed unpadded) and `--unpad_batches false`
/// (dense padded compute) train to the same loss, LoRA dropout on, and each
/// report says which ran.
#[test]
fn unpadded_and_dense_padded_runs_agree() {
    let run = |unpad: &str| {
        let out = glm4(&[
            "--model_config",
            "tiny",
            "--random_init",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--batch_size",
            "4",
            "--seq_len",
            "64",
            "--data",
            "data/demo_alpaca.json",
            "--num_records",
            "8",
            "--unpad_batches",
            unpad,
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let r: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        assert_eq!(r["unpad_batches"].as_bool(), Some(unpad == "true"));
        assert!(
            r["padding_fraction"].as_f64().unwrap() > 0.0,
            "no padding to remove"
        );
        r["train_loss"].as_f64().unwrap()
    };
    let (unpadded, dense) = (run("true"), run("false"));
    assert!(
        (unpadded - dense).abs() <= 1e-6 * (1.0 + dense.abs()),
        "unpadded {unpadded} vs dense {dense}"
    );
}

#[test]
fn dpo_method_reports_json_on_preference_pairs() {
    let out = glm4(&[
        "--model_config",
        "tiny",
        "--random_init",
        "--method",
        "dpo",
        "--data",
        "data/demo_dpo.json",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch_size",
        "2",
        "--seq_len",
        "128",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let r: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"));
    assert_eq!(r["method"], "dpo", "{r}");
    assert_eq!(r["reference_model"], "adapters disabled (no copy)", "{r}");
    assert_eq!(r["measured_steps"], 2);
    // demo_dpo.json's 48 pairs; each pair counts both rows (prompt + chosen, prompt + rejected).
    assert_eq!(r["num_records"], 48);
    let dataset_tokens = r["dataset_tokens"].as_u64().unwrap();
    let measured = r["measured_tokens"].as_u64().unwrap();
    assert!(measured > 0 && measured < dataset_tokens, "{r}");
    for k in ["tokens_per_second", "peak_rss_mb", "measured_cpu_seconds"] {
        assert!(r[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {r}");
    }
    // LoRA on q/k/v of the tiny model, as in the SFT run.
    assert_eq!(r["trainable_parameters"], 2 * (2048 + 2 * 1536));
    assert!(r["train_loss"].as_f64().is_some_and(f64::is_finite), "{r}");

    // DPO needs preference pairs, and SFT-only layouts are refused by name.
    let synthetic = glm4(&["--model_config", "tiny", "--method", "dpo"]);
    assert!(!synthetic.status.success());
    assert!(text(&synthetic.stderr).contains("--method dpo needs --data"));
    let packing = glm4(&[
        "--model_config",
        "tiny",
        "--method",
        "dpo",
        "--data",
        "data/demo_dpo.json",
        "--packing",
    ]);
    assert!(!packing.status.success());
    assert!(text(&packing.stderr).contains("--packing is not supported with --method dpo"));
}
