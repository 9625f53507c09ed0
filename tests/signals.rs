//! A second Ctrl-C (or a burst of SIGTERMs) a few milliseconds after the first
//! ends `glm4 sft` with status 130 — never a crash (SIGSEGV), never a panic.
//! Before the fix the second signal called `std::process::exit` from the
//! handler thread while the main thread was inside libtorch: 7 of 8 such runs
//! died with SIGABRT or printed a panic (SIGSEGV in the report).

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Starts a long `glm4 sft` on the tiny model, waits until optimizer steps are
/// running (the first logged loss), sends `signals` (signal, pause before it),
/// and returns the exit status and everything written to stderr.
fn interrupted_run(name: &str, signals: &[(i32, Duration)]) -> (std::process::ExitStatus, String) {
    let out = std::env::temp_dir().join(format!("glm4-signals-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut child = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "sft",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--data_files",
            "data/demo_alpaca.json",
            "--output_dir",
            out.to_str().unwrap(),
            "--max_steps",
            "100000",
            "--save_steps",
            "1000000",
            "--logging_steps",
            "1",
            "--eval_strategy",
            "no",
            "--no_predict",
            "--bf16",
            "false",
            "--disable_tqdm",
            "true",
            // Steps long enough (tens of ms) that the second signal lands mid-step, inside libtorch.
            "--per_device_train_batch_size",
            "16",
            "--gradient_accumulation_steps",
            "4",
        ])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{name}: training never logged a loss:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if line.contains("'loss'") {
            break;
        }
    }
    let pid = child.id() as i32;
    for &(signal, pause) in signals {
        std::thread::sleep(pause);
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(pid, signal) };
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    log.extend(rx.try_iter().map(|l| l + "\n"));
    let _ = std::fs::remove_dir_all(&out);
    (status, log)
}

/// What any interrupted run may end with: 130 (the second signal exited at
/// once), or 0 only when the first signal's clean stop — checkpoint written,
/// "interrupted: stopped after step" — completed before the next signal was
/// handled. Never a signal death, never a panic.
fn check(name: &str, status: std::process::ExitStatus, log: &str) {
    assert_eq!(
        status.signal(),
        None,
        "{name}: killed by signal {:?}\n{log}",
        status.signal()
    );
    assert!(
        !log.contains("panicked") && !log.contains("RUST_BACKTRACE"),
        "{name}: panic\n{log}"
    );
    match status.code() {
        Some(130) => assert!(
            log.contains("second interrupt: exiting now"),
            "{name}: 130 without the message\n{log}"
        ),
        Some(0) => assert!(
            log.contains("interrupted: stopped after step") && !log.contains("second interrupt"),
            "{name}: status 0 must be the first interrupt's clean stop\n{log}"
        ),
        other => panic!("{name}: exit status {other:?}\n{log}"),
    }
}

#[test]
fn second_ctrl_c_exits_130_without_crashing() {
    for i in 0..6u64 {
        let name = format!("int-{i}");
        let (status, log) = interrupted_run(
            &name,
            &[
                (libc::SIGINT, Duration::ZERO),
                (libc::SIGINT, Duration::from_millis(1 + i + i / 3)),
            ],
        );
        check(&name, status, &log);
    }
}

#[test]
fn burst_of_sigterms_exits_130_without_crashing() {
    for i in 0..3u64 {
        let name = format!("term-{i}");
        let mut burst = vec![(libc::SIGTERM, Duration::ZERO)];
        burst.extend((0..20).map(|_| (libc::SIGTERM, Duration::from_micros(200 + 300 * i))));
        let (status, log) = interrupted_run(&name, &burst);
        check(&name, status, &log);
    }
}
