//! Output into a closed pipe (`glm4 preview … | head -2`) is a normal end:
//! status 0, nothing on stderr about it, no panic. Each case spawns glm4 with
//! its stdout on a pipe whose read end is closed before glm4 writes, so every
//! write fails with EPIPE (before the fix: "failed printing to stdout: Broken
//! pipe" and a panic, status 101).

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn into_closed_pipe(args: &[&str]) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end at once: nothing glm4 prints can be read.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{args:?}: {err}"
    );
    assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
}

#[test]
fn help_into_a_closed_pipe_ends_quietly() {
    into_closed_pipe(&["--help"]);
    into_closed_pipe(&["sft", "--help"]);
}

#[test]
fn preview_into_a_closed_pipe_ends_quietly() {
    into_closed_pipe(&[
        "preview",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        "data/demo_alpaca.json",
    ]);
}

#[test]
fn generate_into_a_closed_pipe_ends_quietly() {
    into_closed_pipe(&[
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--prompt",
        "你好",
        "--max_new_tokens",
        "2",
    ]);
}
