//! The docs cannot drift from the code: `docs/FLAGS.md` is generated from the
//! config structs, and every `glm4` command in README.md runs.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn flags_reference_is_up_to_date() {
    let path = root().join("docs/FLAGS.md");
    let generated = glm4::tutorial::flags_markdown();
    if std::env::var("UPDATE_DOCS").is_ok() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/FLAGS.md is stale: run `UPDATE_DOCS=1 cargo test --release --test docs`"
    );
}

/// Splits a shell command line (double quotes, no other shell features).
fn split(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The commands in README.md's ```bash blocks.
fn readme_commands() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut in_bash = false;
    let mut cmds = Vec::new();
    for line in text.lines() {
        if line.starts_with("```bash") {
            in_bash = true;
        } else if line.starts_with("```") {
            in_bash = false;
        } else if in_bash && !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            // Drop a trailing comment (README commands use no '#' inside arguments).
            let cmd = line.split(" #").next().unwrap().trim().to_string();
            cmds.push(cmd);
        }
    }
    cmds
}

/// Each `target/release/glm4 …` command runs: it succeeds, or — when it names
/// the 9B model this machine does not have, needs CUDA, or needs the network —
/// fails with the clear message meant for that case (which proves its flags
/// parse). Each `make …` command names a real target and existing files.
#[test]
fn every_readme_command_runs() {
    let cmds = readme_commands();
    assert!(cmds.len() >= 15, "{cmds:?}");
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let out_dir = std::env::temp_dir().join(format!("glm4-readme-{}", std::process::id()));
    for cmd in &cmds {
        let words = split(cmd);
        match words[0].as_str() {
            "make" => {
                let target = &words[1];
                assert!(
                    makefile.contains(&format!("\n{target}:")),
                    "README: no make target {target}"
                );
                for w in &words[2..] {
                    if let Some(cfg) = w
                        .strip_prefix("CONFIG=")
                        .or_else(|| w.strip_prefix("DEEPSPEED="))
                    {
                        assert!(root().join(cfg).is_file(), "README: {cfg} does not exist");
                    }
                }
            }
            // A launcher line: its glm4 part must run like a plain command (the
            // launch itself is exercised by tests/distributed.rs).
            ".venv/bin/torchrun" => {
                let at = words
                    .iter()
                    .position(|w| w == "--no-python")
                    .unwrap_or_else(|| panic!("README: torchrun without --no-python: {cmd}"));
                assert_eq!(words[at + 1], "target/release/glm4", "{cmd}");
                assert!(root().join(".venv/bin/torchrun").is_file());
                run_glm4(&words[at + 2..], cmd, &out_dir);
            }
            "target/release/glm4" => run_glm4(&words[1..], cmd, &out_dir),
            "cargo" => assert!(root()
                .join("trl_like/examples/custom_callback.rs")
                .is_file()),
            "tensorboard" | "swanlab" => {}
            other => panic!("README: unexpected command {other:?} in {cmd}"),
        }
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// Runs `glm4 args…`: it succeeds, or fails with one of the messages meant for
/// a missing model, no CUDA, or no network.
fn run_glm4(words: &[String], cmd: &str, out_dir: &std::path::Path) {
    // Keep outputs out of the work tree.
    let args: Vec<String> = words
        .iter()
        .map(|w| {
            if w.starts_with("output/") {
                out_dir.join(w).display().to_string()
            } else {
                w.clone()
            }
        })
        .collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(&args)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(b"quit\n");
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !err.contains("panicked"),
        "README command panicked: {cmd}\n{err}"
    );
    if !res.status.success() {
        let expected = ["does not exist", "CUDA", "HF_HUB_OFFLINE"]
            .iter()
            .any(|m| err.contains(m));
        assert!(expected, "README command failed unexpectedly: {cmd}\n{err}");
    }
}
