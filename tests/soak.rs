//! Memory stays flat over a long run: no tensor or graph leaks across training
//! steps, evaluations, checkpoints and prediction callbacks. `make test` runs a
//! short version; `make soak` runs 2,000 steps (SOAK_STEPS).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn memory_stays_flat_over_a_long_run() {
    let steps: usize = std::env::var("SOAK_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("glm4-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let every = (steps / 10).max(1).to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "sft",
            "--config",
            "configs/demo.yaml",
            "--output_dir",
            out.to_str().unwrap(),
            "--max_steps",
            &steps.to_string(),
            "--eval_steps",
            &every,
            "--save_steps",
            &every,
            "--save_total_limit",
            "2",
            "--logging_steps",
            "10",
            "--predict_max_new_tokens",
            "16",
            "--disable_tqdm",
            "true",
            "--report_to",
            "none",
        ])
        .current_dir(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut samples = Vec::new();
    // Sample until the final adapter is written (the last thing `glm4 sft` does):
    // the process teardown after it can briefly raise RSS by ~10-20 % (seen
    // ~150 ms after the last file is written), which no training step, evaluation
    // or checkpoint causes and which made this test fail at random.
    let final_adapter = out.join("adapter_model.safetensors");
    while child.try_wait().unwrap().is_none() && !final_adapter.exists() {
        if let Some(kb) = rss_kb(child.id()) {
            samples.push(kb);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(child.wait().unwrap().success());
    assert!(
        samples.len() >= 20,
        "the run was too short to judge ({} samples)",
        samples.len()
    );
    // Warm-up: the first third (allocator pools, first checkpoint, first generation).
    let third = samples.len() / 3;
    let middle = *samples[third..2 * third].iter().max().unwrap() as f64;
    let end = *samples[2 * third..].iter().max().unwrap() as f64;
    let growth = end / middle - 1.0;
    eprintln!(
        "peak RSS middle third {middle} kB, last third {end} kB: {:+.1}% over {steps} steps",
        100.0 * growth
    );
    assert!(
        growth < 0.05,
        "RSS grew {:.1}% after warm-up ({middle} kB -> {end} kB)",
        100.0 * growth
    );
    let _ = std::fs::remove_dir_all(&out);
}
