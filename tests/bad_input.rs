//! Every bad input gets a clear one-line error — what, where, how to fix —
//! exit status 1, no panic or backtrace, and nothing half-written. Table-driven:
//! each case builds its broken input, runs `glm4`, and names the words the
//! error must contain.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Case {
    name: &'static str,
    /// Builds the input in `dir`; returns the glm4 arguments.
    setup: fn(&Path) -> Vec<String>,
    /// Words the error message must contain.
    expect: &'static [&'static str],
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// `glm4 sft` on the tiny model with `data` and extra flags, writing into `dir/out`.
fn sft(dir: &Path, data: &str, extra: &[&str]) -> Vec<String> {
    let out = dir.join("out").display().to_string();
    let mut v = s(&[
        "sft",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--data_files",
        data,
        "--output_dir",
        &out,
        "--max_steps",
        "1",
        "--no_predict",
        "--bf16",
        "false",
        "--disable_tqdm",
        "true",
    ]);
    v.extend(s(extra));
    v
}

/// A copy of the tiny model whose files a case may break.
fn model_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(root().join("weights/tiny-glm").join(f), m.join(f)).unwrap();
    }
    m
}

/// The PEFT adapter fixture (made for weights/tiny-glm).
fn adapter_fixture() -> PathBuf {
    root().join("tests/fixtures/trainer/peft_adapter")
}

fn merge(model: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = s(&["merge", "--model_name_or_path"]);
    v.push(model.display().to_string());
    v.push("--adapter_path".into());
    v.push(adapter.display().to_string());
    v.push("--output_dir".into());
    v.push(out.display().to_string());
    v.extend(s(extra));
    v
}

/// A finished one-step run in `dir/out` with `checkpoint-1`, to resume from.
fn checkpointed_run(dir: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(sft(dir, "data/demo_alpaca.json", &["--save_steps", "1"]))
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The table checks that a failing case leaves no final state behind.
    std::fs::remove_file(dir.join("out/trainer_state.json")).unwrap();
}

fn generate(model: &Path) -> Vec<String> {
    s(&[
        "generate",
        "--model_name_or_path",
        model.to_str().unwrap(),
        "--prompt",
        "你好",
        "--max_new_tokens",
        "2",
    ])
}

const CASES: &[Case] = &[
    Case {
        name: "malformed JSON",
        setup: |d| {
            let f = write(d, "bad.json", "[{\"instruction\": \"a\", \"output\": }]");
            sft(d, &f, &[])
        },
        expect: &["bad.json", "invalid JSON", "line 1"],
    },
    Case {
        name: "bad JSONL line",
        setup: |d| {
            let f = write(d, "bad.jsonl", "{\"text\": \"ok\"}\n{\"text\": oops}\n");
            sft(d, &f, &[])
        },
        expect: &["bad.jsonl", "line 2"],
    },
    Case {
        name: "record missing output",
        setup: |d| {
            let f = write(
                d,
                "m.json",
                "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"c\"}]",
            );
            sft(d, &f, &["--test_size", "0", "--eval_strategy", "no"])
        },
        expect: &["m.json record 1", "\"output\"", "--skip_bad_records"],
    },
    Case {
        name: "wrong field type",
        setup: |d| {
            let f = write(d, "t.json", "[{\"instruction\": 5, \"output\": \"b\"}]");
            sft(d, &f, &["--test_size", "0", "--eval_strategy", "no"])
        },
        expect: &["t.json record 0", "\"instruction\" must be a string"],
    },
    Case {
        name: "conversations not a list",
        setup: |d| {
            let f = write(d, "c.json", "[{\"conversations\": \"hi\"}]");
            sft(d, &f, &["--test_size", "0", "--eval_strategy", "no"])
        },
        expect: &["c.json record 0", "\"conversations\""],
    },
    Case {
        name: "tools not JSON",
        setup: |d| {
            let f = write(d, "tools.json", "[{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}], \"tools\": \"[{oops\"}]");
            sft(d, &f, &["--test_size", "0", "--eval_strategy", "no"])
        },
        expect: &["tools.json record 0", "\"tools\" is not valid JSON"],
    },
    Case {
        name: "empty dataset",
        setup: |d| {
            let f = write(d, "empty.json", "[]");
            sft(d, &f, &[])
        },
        expect: &["empty.json", "empty"],
    },
    Case {
        name: "empty split",
        setup: |d| {
            let f = write(
                d,
                "one.json",
                "[{\"instruction\": \"a\", \"output\": \"b\"}]",
            );
            sft(d, &f, &[])
        },
        expect: &["test_size", "no training records"],
    },
    Case {
        name: "unknown flag",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--learning_rat", "1e-4"]),
        expect: &["--learning_rat", "did you mean", "--learning_rate"],
    },
    Case {
        name: "unknown YAML key",
        setup: |d| {
            let f = write(d, "c.yaml", "lora_rr: 8\n");
            sft(d, "data/demo_alpaca.json", &["--config", &f])
        },
        expect: &["c.yaml", "lora_rr", "lora_r"],
    },
    Case {
        name: "wrong value type",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--learning_rate", "abc"]),
        expect: &["learning_rate", "abc"],
    },
    Case {
        name: "out of range",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--lora_r", "0"]),
        expect: &["lora_r"],
    },
    Case {
        name: "ratio that is not a ratio",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--eval_steps", "1.5"]),
        expect: &["eval_steps", "1.5"],
    },
    Case {
        name: "missing model directory",
        setup: |_| {
            s(&[
                "generate",
                "--model_name_or_path",
                "weights/nope",
                "--prompt",
                "x",
            ])
        },
        expect: &["weights/nope", "does not exist", "glm4 download"],
    },
    Case {
        name: "hub id while offline",
        setup: |d| {
            s(&[
                "download",
                "THUDM/glm-4-9b-hf",
                "--local_dir",
                d.join("dl").to_str().unwrap(),
            ])
        },
        expect: &["HF_HUB_OFFLINE"],
    },
    Case {
        name: "config.json without model_type",
        setup: |d| {
            let m = model_copy(d);
            std::fs::write(m.join("config.json"), "{\"hidden_size\": 128}").unwrap();
            generate(&m)
        },
        expect: &["config.json", "model_type"],
    },
    Case {
        name: "config.json of another architecture",
        setup: |d| {
            let m = model_copy(d);
            std::fs::write(m.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
            generate(&m)
        },
        expect: &["config.json", "llama", "glm"],
    },
    Case {
        name: "truncated safetensors",
        setup: |d| {
            let m = model_copy(d);
            let b = std::fs::read(m.join("model.safetensors")).unwrap();
            std::fs::write(m.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
            generate(&m)
        },
        expect: &["model.safetensors", "not a valid safetensors file"],
    },
    Case {
        name: "tensor with the wrong shape",
        setup: |d| {
            let m = model_copy(d);
            let cfg = std::fs::read_to_string(m.join("config.json"))
                .unwrap()
                .replace("\"intermediate_size\": 256", "\"intermediate_size\": 300");
            std::fs::write(m.join("config.json"), cfg).unwrap();
            generate(&m)
        },
        expect: &["mlp", "has shape", "the model expects"],
    },
    Case {
        name: "adapter for another model",
        setup: |d| {
            let m = model_copy(d);
            let mut g = generate(&m);
            g.extend(s(&[
                "--adapter_path",
                "tests/fixtures/trainer/b1/adapter_init",
            ]));
            let cfg = std::fs::read_to_string(m.join("config.json"))
                .unwrap()
                .replace("\"hidden_size\": 128", "\"hidden_size\": 64")
                .replace("\"head_dim\": 32", "\"head_dim\": 16");
            std::fs::write(m.join("config.json"), cfg).unwrap();
            g
        },
        expect: &["shape"],
    },
    Case {
        name: "non-empty output_dir without checkpoints",
        setup: |d| {
            std::fs::create_dir_all(d.join("out")).unwrap();
            std::fs::write(d.join("out/x"), "").unwrap();
            sft(d, "data/demo_alpaca.json", &[])
        },
        expect: &["not empty", "--overwrite_output_dir"],
    },
    Case {
        name: "merge into the base model's folder",
        setup: |d| {
            let m = model_copy(d);
            merge(&m, &adapter_fixture(), &m, &[])
        },
        expect: &["--output_dir", "is the --model_name_or_path folder"],
    },
    Case {
        name: "merge into the adapter's folder",
        setup: |d| {
            let a = d.join("adapter");
            std::fs::create_dir_all(&a).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(adapter_fixture().join(f), a.join(f)).unwrap();
            }
            merge(
                &root().join("weights/tiny-glm"),
                &a,
                &a,
                &["--overwrite_output_dir"],
            )
        },
        expect: &["is the --adapter_path folder"],
    },
    Case {
        name: "merge into a folder that contains the base model",
        setup: |d| {
            let m = model_copy(d);
            merge(&m, &adapter_fixture(), d, &["--overwrite_output_dir"])
        },
        expect: &["contains the --model_name_or_path folder"],
    },
    Case {
        name: "merge into a non-empty folder",
        setup: |d| {
            std::fs::create_dir_all(d.join("out")).unwrap();
            std::fs::write(d.join("out/model.safetensors"), "older model").unwrap();
            merge(
                &root().join("weights/tiny-glm"),
                &adapter_fixture(),
                &d.join("out"),
                &[],
            )
        },
        expect: &["not empty", "--overwrite_output_dir"],
    },
    Case {
        name: "resume with another batch size",
        setup: |d| {
            checkpointed_run(d);
            sft(
                d,
                "data/demo_alpaca.json",
                &["--save_steps", "1", "--per_device_train_batch_size", "4"],
            )
        },
        expect: &[
            "cannot resume from",
            "checkpoint-1",
            "batch",
            "--ignore_data_skip",
        ],
    },
    Case {
        name: "resume with other training data",
        setup: |d| {
            checkpointed_run(d);
            let f = write(
                d,
                "other.json",
                "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"c\", \"output\": \"d\"}]",
            );
            sft(
                d,
                &f,
                &[
                    "--save_steps",
                    "1",
                    "--test_size",
                    "0",
                    "--eval_strategy",
                    "no",
                ],
            )
        },
        expect: &["cannot resume from", "training data differ"],
    },
    Case {
        name: "resume on another base model",
        setup: |d| {
            checkpointed_run(d);
            let m = model_copy(d);
            let mut w = tch::Tensor::read_safetensors(m.join("model.safetensors")).unwrap();
            for (_, t) in w.iter_mut() {
                *t = &*t + 0.5;
            }
            tch::Tensor::write_safetensors(&w, m.join("model.safetensors")).unwrap();
            let mut v = sft(d, "data/demo_alpaca.json", &["--save_steps", "1"]);
            let i = v.iter().position(|a| a == "--model_name_or_path").unwrap();
            v[i + 1] = m.display().to_string();
            v
        },
        expect: &["cannot resume from", "base model", "weights differ"],
    },
    Case {
        name: "unwritable output_dir",
        setup: |d| {
            std::fs::write(d.join("file"), "").unwrap();
            let out = d.join("file/out").display().to_string();
            let mut v = sft(d, "data/demo_alpaca.json", &[]);
            let i = v.iter().position(|a| a == "--output_dir").unwrap();
            v[i + 1] = out;
            v
        },
        expect: &["file/out"],
    },
    Case {
        name: "missing model directory in sft",
        setup: |d| {
            let mut v = sft(d, "data/demo_alpaca.json", &[]);
            let i = v.iter().position(|a| a == "weights/tiny-glm").unwrap();
            v[i] = "weights/nope".into();
            v
        },
        expect: &["weights/nope", "does not exist", "glm4 download"],
    },
    Case {
        name: "missing model directory in preview",
        setup: |_| {
            s(&[
                "preview",
                "--model_name_or_path",
                "weights/nope",
                "--data_files",
                "data/demo_alpaca.json",
            ])
        },
        expect: &["weights/nope", "does not exist", "glm4 download"],
    },
    Case {
        name: "first record lacks output",
        setup: |d| {
            let f = write(
                d,
                "noout.json",
                "[{\"instruction\": \"a\", \"input\": \"b\"}]",
            );
            sft(d, &f, &["--test_size", "0", "--eval_strategy", "no"])
        },
        expect: &["noout.json record 0", "alpaca", "\"output\""],
    },
    Case {
        name: "JSONL with a byte order mark",
        setup: |d| {
            // A BOM, then a record that lacks "output": the error about the
            // record shows that the line was read as JSON.
            let f = write(d, "bom.jsonl", "\u{feff}{\"instruction\": \"a\"}\n");
            sft(d, &f, &["--test_size", "0", "--eval_strategy", "no"])
        },
        expect: &["bom.jsonl line 1", "\"output\""],
    },
    Case {
        name: "data file that is not UTF-8",
        setup: |d| {
            let p = d.join("gbk.jsonl");
            let mut bytes = b"{\"text\": \"ok\"}\n{\"text\": \"".to_vec();
            bytes.extend([0xC4, 0xE3, 0xBA, 0xC3]);
            bytes.extend(b"\"}\n");
            std::fs::write(&p, bytes).unwrap();
            sft(d, p.to_str().unwrap(), &[])
        },
        expect: &["gbk.jsonl", "not UTF-8", "line 2", "byte offset 25"],
    },
    Case {
        name: "chat template that does not compile",
        setup: |d| {
            let m = model_copy(d);
            std::fs::write(
                m.join("chat_template.jinja"),
                "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}",
            )
            .unwrap();
            let mut v = sft(d, "data/demo_alpaca.json", &[]);
            let i = v.iter().position(|a| a == "weights/tiny-glm").unwrap();
            v[i] = m.display().to_string();
            v
        },
        expect: &["chat_template.jinja, line 3", "does not compile"],
    },
    Case {
        name: "checkpoint without its optimizer state",
        setup: |d| {
            let ckpt = d.join("out/checkpoint-1");
            std::fs::create_dir_all(&ckpt).unwrap();
            std::fs::write(ckpt.join("trainer_state.json"), MIN_STATE).unwrap();
            std::fs::write(
                ckpt.join("training_args.json"),
                "{\"save_only_model\": false}",
            )
            .unwrap();
            sft(d, "data/demo_alpaca.json", &[])
        },
        expect: &["checkpoint-1", "optimizer.safetensors is missing"],
    },
    Case {
        name: "eos_token not in the vocabulary",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--eos_token", "<notatoken>"]),
        expect: &["eos_token", "<notatoken>", "not in the vocabulary"],
    },
    Case {
        name: "pad_token not in the vocabulary",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--pad_token", "bogus"]),
        expect: &["pad_token", "bogus", "not in the vocabulary"],
    },
    Case {
        name: "chat_template_path that does not exist",
        setup: |d| {
            let f = d.join("missing.jinja").display().to_string();
            sft(d, "data/demo_alpaca.json", &["--chat_template_path", &f])
        },
        expect: &["chat_template_path", "missing.jinja", "no such file"],
    },
    Case {
        name: "chat_template_path that does not compile",
        setup: |d| {
            let f = write(d, "broken.jinja", "{% for m in messages %}{{ m.content }");
            sft(d, "data/demo_alpaca.json", &["--chat_template_path", &f])
        },
        expect: &["chat_template_path", "broken.jinja", "does not compile"],
    },
    Case {
        name: "chat_template_path: a tokenizer with tokens the model lacks",
        setup: |d| {
            let m = model_copy(d);
            let tok = std::fs::read_to_string(m.join("tokenizer.json"))
                .unwrap()
                .replace("<|begin_of_video|>", "<|brand_new|>");
            std::fs::write(m.join("tokenizer.json"), tok).unwrap();
            let m = m.display().to_string();
            sft(d, "data/demo_alpaca.json", &["--chat_template_path", &m])
        },
        expect: &[
            "chat_template_path",
            "<|brand_new|>",
            "resize the embeddings",
        ],
    },
    Case {
        name: "unknown attn_implementation",
        setup: |d| {
            sft(
                d,
                "data/demo_alpaca.json",
                &["--attn_implementation", "bogus"],
            )
        },
        expect: &[
            "attn_implementation",
            "bogus",
            "eager, sdpa, flash_attention_2",
        ],
    },
    Case {
        name: "flash_attention_2 on the CPU",
        setup: |d| {
            sft(
                d,
                "data/demo_alpaca.json",
                &[
                    "--attn_implementation",
                    "flash_attention_2",
                    "--use_cpu",
                    "true",
                ],
            )
        },
        expect: &["flash_attention_2", "CUDA", "sdpa"],
    },
    Case {
        name: "max_length 1",
        setup: |d| sft(d, "data/demo_alpaca.json", &["--max_length", "1"]),
        expect: &["max_length", "at least 2"],
    },
    Case {
        name: "every prompt longer than max_length",
        setup: |d| {
            let long = "很长的问题".repeat(20);
            let recs: Vec<String> = (0..4)
                .map(|i| format!("{{\"prompt\": \"{long}{i}\", \"completion\": \"答{i}\"}}"))
                .collect();
            let f = write(d, "pc.jsonl", &recs.join("\n"));
            sft(
                d,
                &f,
                &[
                    "--max_length",
                    "8",
                    "--test_size",
                    "0",
                    "--eval_strategy",
                    "no",
                ],
            )
        },
        expect: &[
            "none of the 4 training examples",
            "max_length 8",
            "--max_length",
        ],
    },
    Case {
        name: "adapter config naming other target modules than its tensors",
        setup: |d| {
            let a = adapter_copy(d, |cfg| {
                cfg["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
            });
            let mut g = generate(&root().join("weights/tiny-glm"));
            g.extend(s(&["--adapter_path", &a]));
            g
        },
        expect: &[
            "adapter_config.json",
            "disagree",
            "[\"q_proj\", \"v_proj\"]",
            "k_proj",
        ],
    },
    Case {
        name: "adapter config naming other layers than its tensors",
        setup: |d| {
            let a = adapter_copy(d, |cfg| {
                cfg["layers_to_transform"] = serde_json::json!([0]);
            });
            let mut g = generate(&root().join("weights/tiny-glm"));
            g.extend(s(&["--adapter_path", &a]));
            g
        },
        expect: &[
            "adapter_config.json",
            "disagree",
            "layers_to_transform [0]",
            "on layers 0, 1",
        ],
    },
];

/// The smallest trainer_state.json a checkpoint can have.
const MIN_STATE: &str = r#"{"epoch": 0.1, "global_step": 1, "max_steps": 1, "logging_steps": 1,
 "eval_steps": 1, "save_steps": 1, "train_batch_size": 8, "num_train_epochs": 1,
 "num_input_tokens_seen": 10, "total_flos": 0.0, "log_history": [], "best_metric": null,
 "best_global_step": null, "best_model_checkpoint": null, "is_local_process_zero": true,
 "is_world_process_zero": true, "is_hyper_param_search": false, "trial_name": null,
 "trial_params": null}"#;

/// A copy of a PEFT-saved adapter of the tiny model with its config edited.
fn adapter_copy(dir: &Path, edit: fn(&mut serde_json::Value)) -> String {
    let src = root().join("tests/fixtures/trainer/b1/adapter_init");
    let a = dir.join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        a.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
    a.display().to_string()
}

#[test]
fn every_bad_input_gets_a_clear_error() {
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("glm4-bad-{}-{i}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let args = (case.setup)(&dir);
        let out = Command::new(env!("CARGO_BIN_EXE_glm4"))
            .args(&args)
            .current_dir(root())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let error_line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("")
            .to_string();
        let missing: Vec<&&str> = case
            .expect
            .iter()
            .filter(|w| !error_line.contains(**w))
            .collect();
        if out.status.code() != Some(1) || err.contains("panicked") || !missing.is_empty() {
            failures.push(format!(
                "{}: status {:?}, missing {missing:?}\n{err}",
                case.name,
                out.status.code()
            ));
        }
        // Nothing half-written: no checkpoint, no final state.
        assert!(
            !dir.join("out/trainer_state.json").exists(),
            "{}: left a trainer_state.json",
            case.name
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n---\n")
    );
}

/// Every record longer than max_length: a warning with the count, then training on the truncated records.
#[test]
fn overlong_records_are_truncated_with_a_count() {
    let dir = std::env::temp_dir().join(format!("glm4-long-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(sft(
            &dir,
            "data/demo_alpaca.json",
            &["--max_length", "8", "--save_strategy", "no"],
        ))
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("76 of 76 training examples were longer than max_length 8"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tokenizer without a chat template gets the GLM-4 one, with a notice.
#[test]
fn missing_chat_template_falls_back_with_a_notice() {
    let dir = std::env::temp_dir().join(format!("glm4-notpl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let m = model_copy(&dir);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(m.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let with = |model: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_glm4"))
            .args([
                "generate",
                "--model_name_or_path",
                model.to_str().unwrap(),
                "--chat",
                "--prompt",
                "你好",
                "--max_new_tokens",
                "3",
                "--json",
            ])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (fallback, notice) = with(&m);
    let (original, _) = with(&root().join("weights/tiny-glm"));
    assert!(
        notice.contains("no chat template") && notice.contains("GLM-4 template"),
        "{notice}"
    );
    assert_eq!(
        fallback, original,
        "the fallback is the GLM-4 template the tiny tokenizer ships"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An OS error's text appears once, not once per link of the error chain.
#[test]
fn os_errors_are_printed_once() {
    let dir = std::env::temp_dir().join(format!("glm4-oserr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // output_dir is an existing file: creating the folder fails with EEXIST.
    std::fs::write(dir.join("out"), "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args(sft(
            &dir,
            "data/demo_alpaca.json",
            &["--overwrite_output_dir", "true"],
        ))
        .current_dir(root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(line.matches("os error").count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
