//! Helpers shared by the test binaries: the trainer parity checks
//! (tests/trainer_parity.rs, tests/padding_free_parity.rs: our `log_history`
//! against TRL's) and a stderr watcher for the interrupt tests. Each binary
//! uses part of this module.
#![allow(dead_code)]

pub mod launch;

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;

/// `a` within `tol` of `b`, relative to `1 + |b|`.
pub fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// The first four optimizer steps of `got` against TRL's `expected`: loss,
/// grad_norm and learning rate within 1e-5, entropy within 1e-4, num_tokens
/// and token accuracy exactly, the step, and the epoch through `epoch_matches(ours, trl)`;
/// then the final `train_loss` (entry 4). Returns the worst relative error of
/// loss / grad_norm / learning rate.
pub fn check_log_history(
    setting: &str,
    got: &[Map<String, Value>],
    expected: &[Value],
    epoch_matches: impl Fn(f64, f64) -> bool,
) -> f64 {
    assert_eq!(
        got.len(),
        expected.len(),
        "{setting}: number of log entries"
    );
    let mut worst: f64 = 0.0;
    for (step, (g, e)) in got.iter().zip(expected).enumerate().take(4) {
        let step = step + 1;
        for key in ["loss", "grad_norm", "learning_rate"] {
            let (gv, ev) = (g[key].as_f64().unwrap(), e[key].as_f64().unwrap());
            worst = worst.max((gv - ev).abs() / (1.0 + ev.abs()));
            assert!(
                close(gv, ev, 1e-5),
                "{setting} step {step}: {key} {gv} vs TRL {ev}"
            );
        }
        let (gv, ev) = (
            g["entropy"].as_f64().unwrap(),
            e["entropy"].as_f64().unwrap(),
        );
        assert!(
            close(gv, ev, 1e-4),
            "{setting} step {step}: entropy {gv} vs TRL {ev}"
        );
        for key in ["num_tokens", "mean_token_accuracy"] {
            assert_eq!(
                g[key].as_f64(),
                e[key].as_f64(),
                "{setting} step {step}: {key}"
            );
        }
        let (ge, ee) = (g["epoch"].as_f64().unwrap(), e["epoch"].as_f64().unwrap());
        assert!(
            epoch_matches(ge, ee),
            "{setting} step {step}: epoch {ge} vs TRL {ee}"
        );
        assert_eq!(g["step"], e["step"]);
    }
    let (gl, el) = (
        got[4]["train_loss"].as_f64().unwrap(),
        expected[4]["train_loss"].as_f64().unwrap(),
    );
    assert!(
        close(gl, el, 1e-5),
        "{setting}: train_loss {gl} vs TRL {el}"
    );
    worst
}

/// Our trained adapter against PEFT's after the same steps
/// (`tests/fixtures/trainer/{setting}/adapter_final`): every tensor within
/// 1e-5. Returns the largest difference.
pub fn check_final_adapter(root: &Path, setting: &str, ours: Vec<(String, Tensor)>) -> f64 {
    let file = root
        .join("tests/fixtures/trainer")
        .join(setting)
        .join("adapter_final/adapter_model.safetensors");
    let reference: HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ours.len(), reference.len());
    let mut worst: f64 = 0.0;
    for (name, t) in ours {
        let diff = (&t - &reference[&name]).abs().max().double_value(&[]);
        worst = worst.max(diff);
        assert!(
            diff < 1e-5,
            "{setting}: {name} differs from PEFT's by {diff}"
        );
    }
    worst
}

/// Reads `child`'s stderr on a thread: the receiver gets a message when a
/// line containing `marker` appears; the handle returns all of stderr once
/// the child closes it. For tests that must act at a point of a run (a
/// fixed sleep races the start-up on a busy machine).
pub fn watch_stderr(
    child: &mut std::process::Child,
    marker: &'static str,
) -> (
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<String>,
) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (seen, wait) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(marker) {
                let _ = seen.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    (wait, reader)
}
