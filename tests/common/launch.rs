//! Launching `glm4` from a test: as one process, or as ranks under the
//! venv's torchrun (tests/distributed.rs, tests/zero.rs), and reading back
//! what a run logged.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory `glm4-{prefix}-{name}-{pid}` under the system temp dir.
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("glm4-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// torchrun from the torch wheel `make setup` installs.
pub fn torchrun() -> PathBuf {
    let p = root().join(".venv/bin/torchrun");
    assert!(p.exists(), "{} is missing: run `make setup`", p.display());
    p
}

/// The run's stderr, after asserting that it succeeded.
pub fn ok(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what} failed:\n{err}");
    err
}

/// `glm4 ARGS` as one process (outside any torchrun launch).
pub fn single(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(args)
        .current_dir(root())
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap()
}

/// `glm4 ARGS` as `nproc` ranks under torchrun on a free local port.
pub fn under_torchrun(nproc: usize, args: &[String]) -> Output {
    Command::new(torchrun())
        .args([
            format!("--nproc_per_node={nproc}"),
            "--master_addr=127.0.0.1".into(),
            format!("--master_port={}", free_port()),
            "--no-python".into(),
            env!("CARGO_BIN_EXE_glm4").into(),
        ])
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// `log_history` of the `trainer_state.json` in `dir`.
pub fn log_history(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["log_history"].as_array().unwrap().clone()
}

/// The values of `key` in the entries of `history` that have it.
pub fn per_step(history: &[Value], key: &str) -> Vec<f64> {
    history
        .iter()
        .filter_map(|e| e.get(key).and_then(Value::as_f64))
        .collect()
}
