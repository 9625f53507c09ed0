//! The fused LM-head loss (the default) against the plain chunked path that
//! `TRL_LIKE_FUSED_LM_LOSS=0` keeps reachable, through the whole trainer: the
//! same steps on the tiny model give the same training loss either way.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// `glm4 bench` on the tiny model; `fused` false sets the fallback switch.
fn train_loss(fused: bool, extra: &[&str]) -> f64 {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glm4"));
    cmd.arg("bench")
        .args([
            "--model_config",
            "tiny",
            "--random_init",
            "--steps",
            "3",
            "--warmup",
            "0",
            "--batch_size",
            "2",
            "--seq_len",
            "24",
            "--device",
            "cpu",
            "--lora_dropout",
            "0",
            "--json",
        ])
        .args(extra)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    if fused {
        cmd.env_remove("TRL_LIKE_FUSED_LM_LOSS");
    } else {
        cmd.env("TRL_LIKE_FUSED_LM_LOSS", "0");
    }
    let out = cmd.output().expect("glm4 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    r["train_loss"]
        .as_f64()
        .unwrap_or_else(|| panic!("no train_loss in {r}"))
}

#[test]
fn fused_and_plain_loss_train_the_same() {
    for extra in [&[][..], &["--gradient_checkpointing", "true"][..]] {
        let (fused, plain) = (train_loss(true, extra), train_loss(false, extra));
        assert!(fused.is_finite() && fused > 0.0);
        assert!(
            (fused - plain).abs() <= 1e-6,
            "{extra:?}: fused {fused} vs plain {plain}"
        );
    }
}
