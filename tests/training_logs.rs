//! What a run prints when nobody watches a terminal (`nohup … > train.log`,
//! CI, `| tee`): every log entry, plain progress lines, the final summary —
//! in one number style — and `total_flos` counted as transformers counts it.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tch::Tensor;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Parameters transformers multiplies by in `floating_point_ops`:
/// `num_parameters(exclude_embeddings=True)` of the (PEFT-wrapped) model, i.e.
/// every base weight but `nn.Embedding` ones, plus the LoRA weights.
fn reference_parameters(adapter_dir: &Path) -> i64 {
    let numel = |file: PathBuf, skip_embeddings: bool| -> i64 {
        Tensor::read_safetensors(file)
            .unwrap()
            .iter()
            .filter(|(name, _)| !(skip_embeddings && name.ends_with("embed_tokens.weight")))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    };
    numel(root().join("weights/tiny-glm/model.safetensors"), true)
        + numel(adapter_dir.join("adapter_model.safetensors"), false)
}

/// A number as transformers 5 prints log values (Python's `{:.4g}`): at most
/// four significant digits, exponents as `e-05`; whole numbers as integers.
fn python_4g_style(v: &str) -> bool {
    let v = v.trim_start_matches('-');
    let (mantissa, exponent) = match v.split_once('e') {
        Some((m, e)) => (m, Some(e)),
        None => (v, None),
    };
    if let Some(e) = exponent {
        let digits = e.trim_start_matches(['+', '-']);
        if !(e.starts_with(['+', '-']) && digits.len() >= 2) {
            return false;
        }
    }
    if !mantissa.contains('.') && exponent.is_none() {
        return mantissa.chars().all(|c| c.is_ascii_digit());
    }
    let significant = mantissa
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|&c| c == '0')
        .count();
    significant <= 4 && !mantissa.ends_with('0')
}

#[test]
fn piped_run_prints_every_log_entry_and_counts_flos() {
    let out = std::env::temp_dir().join(format!("glm4-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // Output goes to pipes, not a terminal, and no --disable_tqdm.
    let run = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "sft",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--data_files",
            "data/demo_alpaca.json",
            "--output_dir",
            out.to_str().unwrap(),
            // Batch 1: no padding, so input_ids.numel() is the token count.
            "--per_device_train_batch_size",
            "1",
            "--max_steps",
            "8",
            "--logging_steps",
            "2",
            "--eval_steps",
            "4",
            "--save_steps",
            "4",
            "--max_length",
            "64",
            "--learning_rate",
            "5e-3",
            "--no_predict",
            "--bf16",
            "false",
        ])
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{text}");

    let entries: Vec<&str> = text.lines().filter(|l| l.starts_with("{'")).collect();
    let count = |key: &str| entries.iter().filter(|l| l.contains(key)).count();
    assert_eq!(count("{'loss': "), 4, "a line per log entry:\n{text}");
    assert_eq!(count("'eval_loss': "), 2, "{text}");
    assert_eq!(count("'train_loss': "), 1, "the final summary:\n{text}");
    assert!(text.contains("step 8/8 (100%)"), "progress lines:\n{text}");
    for line in &entries {
        for item in line.trim_matches(['{', '}']).split(", ") {
            let (key, value) = item.split_once(": ").unwrap();
            assert!(
                python_4g_style(value),
                "{key} = {value} is not in the one number style:\n{line}"
            );
        }
        assert!(!line.contains("total_flos"), "{line}");
    }

    // total_flos = 6 × non-embedding parameters × tokens, in the final state and in the checkpoint.
    let n = reference_parameters(&out);
    for dir in [out.clone(), out.join("checkpoint-4")] {
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
                .unwrap();
        let tokens = state["num_input_tokens_seen"].as_i64().unwrap();
        let flos = state["total_flos"].as_f64().unwrap();
        assert!(flos > 0.0, "{}", dir.display());
        assert_eq!(flos, 6.0 * n as f64 * tokens as f64, "{}", dir.display());
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_number_style_check_can_fail() {
    for good in [
        "7.244",
        "0.0009199",
        "9.199e-05",
        "1.235e+04",
        "64",
        "0",
        "-0.5",
    ] {
        assert!(python_4g_style(good), "{good}");
    }
    for bad in [
        "9.198670696444339e-4",
        "0.003992000",
        "7.244343",
        "1e-4",
        "2306.0",
    ] {
        assert!(!python_4g_style(bad), "{bad}");
    }
}
