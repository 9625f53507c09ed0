//! `TrlParser` end to end: defaults < YAML (`--config`) < flags, every value
//! type, aliases, errors, the step arithmetic against transformers 5.23, and
//! every YAML file in `configs/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use trl_like::config::{
    ConfigError, DPOConfig, DataArguments, DatasetFormat, FDivergenceType, IntervalStrategy,
    ModelConfig, Origin, ParseError, ResumeFrom, SFTConfig, SaveStrategy, SchedulerType,
    TorchDtype, TrainingArguments, TrlParser, TruncationMode,
};

/// The tutorial's application defaults (instruct_train.py's
/// `ChatGLM4ModelConfig`, `DataTrainingArguments` and `MySFTConfig`): the
/// ones `glm4 sft` starts from.
fn tutorial_defaults() -> (ModelConfig, DataArguments, SFTConfig) {
    glm4::tutorial::tutorial_defaults()
}

fn tutorial_parser() -> TrlParser {
    let (m, d, s) = tutorial_defaults();
    TrlParser::new(m, d, s)
}

fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|a| a.to_string()).collect()
}

fn parse(s: &[&str]) -> Result<(ModelConfig, DataArguments, SFTConfig), ParseError> {
    tutorial_parser().parse_args_and_config(&args(s))
}

fn parse_ok(s: &[&str]) -> (ModelConfig, DataArguments, SFTConfig) {
    parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

/// A YAML file with this content in a fresh temporary directory.
fn yaml(content: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "trl_like_config_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("run.yaml");
    std::fs::write(&p, content).unwrap();
    p
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

// ---------------------------------------------------------------- defaults

#[test]
fn no_arguments_give_the_application_defaults() {
    let (m, d, s) = parse_ok(&[]);
    let (em, ed, es) = tutorial_defaults();
    assert_eq!((m, d, s), (em, ed, es));
}

#[test]
fn tutorial_defaults_are_what_instruct_train_py_sets() {
    let (m, d, s) = parse_ok(&[]);
    assert_eq!(
        m.model_name_or_path.as_deref(),
        Some("./weights/glm-4-9b-hf")
    );
    assert_eq!(m.torch_dtype(), TorchDtype::Bfloat16);
    assert!(m.use_peft);
    assert_eq!((m.lora_r, m.lora_alpha, m.lora_dropout), (8, 32, 0.1));
    assert_eq!(
        m.lora_target_modules,
        Some(vec!["q_proj".to_string(), "k_proj".into(), "v_proj".into()])
    );
    assert_eq!(d.data_files, ["./data/alpaca_gpt4_data_zh.json"]);
    assert_eq!(d.test_size, 0.05);
    assert_eq!(s.output_dir, "./output/lora-glm4-9b-alpaca");
    assert_eq!(
        (
            s.num_train_epochs,
            s.per_device_train_batch_size,
            s.per_device_eval_batch_size
        ),
        (3.0, 2, 4)
    );
    assert_eq!((s.gradient_accumulation_steps, s.learning_rate), (1, 5e-4));
    assert!(s.use_bf16() && s.bf16_full_eval);
    assert_eq!(s.max_seq_length(), Some(512));
    assert_eq!(s.eval_strategy, IntervalStrategy::Steps);
    assert_eq!(
        (s.eval_steps, s.logging_steps, s.save_steps),
        (Some(0.1), 10.0, 0.1)
    );
    // Untouched fields keep TRL 1.16's defaults.
    assert_eq!(s.lr_scheduler_type, SchedulerType::Linear);
    assert!(s.gradient_checkpointing);
    assert_eq!(m.model_revision, "main");
}

#[test]
fn trl_defaults_parser() {
    let (m, d, s) = TrlParser::default().parse_args_and_config(&[]).unwrap();
    assert_eq!(m, ModelConfig::default());
    assert_eq!(d, DataArguments::default());
    assert_eq!(s, SFTConfig::default());
    assert_eq!(
        s.bf16, None,
        "TRL 1.16 leaves bf16 unset and resolves it to !fp16"
    );
    assert!(s.use_bf16());
    let (_, _, s) = TrlParser::default()
        .parse_args_and_config(&args(&["--fp16"]))
        .unwrap();
    assert!(s.fp16 && !s.use_bf16());
}

// ---------------------------------------------------------------- precedence

#[test]
fn precedence_default_then_yaml_then_cli() {
    let cfg = yaml("learning_rate: 1.0e-4\nlora_r: 32\nper_device_train_batch_size: 1\n");
    let c = cfg.to_str().unwrap();
    let (m, _, s) = parse_ok(&["--config", c]);
    assert_eq!(
        (s.learning_rate, m.lora_r, s.per_device_train_batch_size),
        (1e-4, 32, 1)
    );
    assert_eq!(
        s.per_device_eval_batch_size, 4,
        "not in the file: application default"
    );
    assert_eq!(s.adam_beta2, 0.999, "in neither: TRL default");

    // Flags win over the file, wherever --config appears.
    let (m, _, s) = parse_ok(&["--learning_rate", "3e-4", "--config", c, "--lora_r", "4"]);
    assert_eq!(
        (s.learning_rate, m.lora_r, s.per_device_train_batch_size),
        (3e-4, 4, 1)
    );
    let (_, _, s) = parse_ok(&[&format!("--config={c}"), "--per_device_train_batch_size=16"]);
    assert_eq!((s.learning_rate, s.per_device_train_batch_size), (1e-4, 16));
}

#[test]
fn repeated_flag_last_one_wins() {
    let (_, _, s) = parse_ok(&["--seed", "1", "--seed", "7"]);
    assert_eq!(s.seed, 7);
}

// ---------------------------------------------------------------- value types

#[test]
fn boolean_forms() {
    let b = |a: &[&str]| parse_ok(a).2.bf16_full_eval;
    assert!(b(&["--bf16_full_eval"]));
    assert!(!b(&["--bf16_full_eval", "false"]));
    assert!(b(&["--bf16_full_eval", "true"]));
    assert!(!b(&["--bf16_full_eval", "False"]));
    assert!(!b(&["--bf16_full_eval=no"]));
    assert!(!b(&["--no_bf16_full_eval"]));
    assert!(!b(&["--no-bf16-full-eval"]));
    assert!(b(&["--no_bf16_full_eval", "--bf16-full-eval"]));
    // A bare boolean followed by another flag.
    let (_, _, s) = parse_ok(&["--packing", "--seed", "3"]);
    assert!(s.packing);
    assert_eq!(s.seed, 3);
    // Option<bool>: none unsets it.
    let (_, _, s) = parse_ok(&["--bf16", "none"]);
    assert_eq!(s.bf16, None);
    let (_, _, s) = parse_ok(&["--no_bf16"]);
    assert_eq!(s.bf16, Some(false));
    assert!(!s.use_bf16());
    // use_peft from the model group.
    assert!(!parse_ok(&["--no-use-peft"]).0.use_peft);
    // Not a boolean.
    let e = parse(&["--packing", "maybe"]).unwrap_err();
    assert!(
        matches!(&e, ParseError::InvalidValue { field, .. } if field == "packing"),
        "{e}"
    );
}

#[test]
fn list_values() {
    let (m, _, _) = parse_ok(&[
        "--lora_target_modules",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "--lora_r",
        "4",
    ]);
    assert_eq!(
        m.lora_target_modules.unwrap(),
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    );
    assert_eq!(m.lora_r, 4);
    let (m, _, _) = parse_ok(&["--lora-target-modules", "all-linear"]);
    assert!(m.targets_all_linear());
    let (m, _, _) = parse_ok(&["--lora_target_modules", "none"]);
    assert_eq!(m.lora_target_modules, None);
    let (m, _, _) = parse_ok(&["--lora_modules_to_save=lm_head"]);
    assert_eq!(m.lora_modules_to_save.unwrap(), ["lm_head"]);
    let (_, d, _) = parse_ok(&["--data_files", "a.json", "b.jsonl"]);
    assert_eq!(d.data_files, ["a.json", "b.jsonl"]);
    // A YAML scalar is a one-element list; a YAML sequence a list.
    let c = yaml("data_files: one.json\nlora_target_modules:\n  - query_key_value\n  - dense\n");
    let (m, d, _) = parse_ok(&["--config", c.to_str().unwrap()]);
    assert_eq!(d.data_files, ["one.json"]);
    assert_eq!(m.lora_target_modules.unwrap(), ["query_key_value", "dense"]);
}

#[test]
fn report_to_forms() {
    assert_eq!(
        parse_ok(&["--report_to", "none"]).2.report_to,
        Vec::<String>::new()
    );
    assert_eq!(
        parse_ok(&["--report_to", "swanlab"]).2.report_to,
        ["swanlab"]
    );
    let s = parse_ok(&["--report_to", "tensorboard", "jsonl"]).2;
    assert_eq!(s.report_to, ["tensorboard", "jsonl"]);
    assert!(s.reports_to("jsonl") && !s.reports_to("swanlab"));
    assert!(parse_ok(&["--report_to", "all"]).2.reports_to("swanlab"));
    let c = yaml("report_to: none\n");
    assert!(parse_ok(&["--config", c.to_str().unwrap()])
        .2
        .report_to
        .is_empty());
    let c = yaml("report_to: [tensorboard, swanlab]\n");
    assert_eq!(
        parse_ok(&["--config", c.to_str().unwrap()]).2.report_to,
        ["tensorboard", "swanlab"]
    );
    let e = parse(&["--report_to", "none", "jsonl"]).unwrap_err();
    assert!(
        matches!(&e, ParseError::Invalid { error, .. } if error.field() == "report_to"),
        "{e}"
    );
}

#[test]
fn optional_values_accept_none() {
    let (_, _, s) = parse_ok(&[
        "--max_length",
        "none",
        "--eval_steps",
        "null",
        "--run_name",
        "None",
    ]);
    assert_eq!(
        (s.max_length, s.eval_steps, s.run_name.as_deref()),
        (None, None, None)
    );
    // eval_steps unset falls back to logging_steps (transformers).
    assert_eq!(s.effective_eval_steps(), Some(10.0));
    let (_, d, _) = parse_ok(&["--max_samples", "100"]);
    assert_eq!(d.max_samples, Some(100));
    let c = yaml("max_length: null\nsave_total_limit: 3\n");
    let (_, _, s) = parse_ok(&["--config", c.to_str().unwrap()]);
    assert_eq!((s.max_length, s.save_total_limit), (None, Some(3)));
    // A required field cannot be none.
    assert!(matches!(
        parse(&["--learning_rate", "none"]),
        Err(ParseError::InvalidValue { .. })
    ));
}

#[test]
fn numbers_and_strings() {
    let (_, d, s) = parse_ok(&[
        "--num_train_epochs",
        "1.5",
        "--max_steps",
        "-1",
        "--warmup_steps",
        "0.1",
        "--seed",
        "1234",
        "--adam_beta2",
        "0.95",
        "--run_name",
        "glm4 run",
        "--test_size",
        "200",
        "--max_grad_norm",
        "0",
    ]);
    assert_eq!(
        (s.num_train_epochs, s.max_steps, s.warmup_steps, s.seed),
        (1.5, -1, 0.1, 1234)
    );
    assert_eq!((s.adam_beta2, s.max_grad_norm), (0.95, 0.0));
    assert_eq!(s.run_name.as_deref(), Some("glm4 run"));
    assert_eq!(d.test_size, 200.0);
    // Integer-valued floats are fine for integer fields in YAML; numbers for strings too.
    let c = yaml("max_steps: 100.0\nrun_name: 2024\nnum_train_epochs: 2\n");
    let (_, _, s) = parse_ok(&["--config", c.to_str().unwrap()]);
    assert_eq!(
        (s.max_steps, s.run_name.as_deref(), s.num_train_epochs),
        (100, Some("2024"), 2.0)
    );
}

#[test]
fn yaml_exponent_spellings() {
    // PyYAML reads `5e-5` (no dot) as a string and argparse converts it; both
    // spellings and a quoted string must give the same number here.
    for text in [
        "learning_rate: 5e-5\n",
        "learning_rate: 5.0e-5\n",
        "learning_rate: \"5e-5\"\n",
        "learning_rate: 0.00005\n",
    ] {
        let c = yaml(text);
        assert_eq!(
            parse_ok(&["--config", c.to_str().unwrap()]).2.learning_rate,
            5e-5,
            "{text}"
        );
    }
}

#[test]
fn enums() {
    let (m, d, s) = parse_ok(&[
        "--lr_scheduler_type",
        "cosine_with_restarts",
        "--save_strategy",
        "epoch",
        "--eval_strategy",
        "epoch",
        "--dtype",
        "float32",
        "--dataset_format",
        "sharegpt",
        "--truncation_mode",
        "keep_end",
    ]);
    assert_eq!(s.lr_scheduler_type, SchedulerType::CosineWithRestarts);
    assert_eq!(
        (s.save_strategy, s.eval_strategy),
        (SaveStrategy::Epoch, IntervalStrategy::Epoch)
    );
    assert_eq!(m.dtype, TorchDtype::Float32);
    assert_eq!(d.dataset_format, DatasetFormat::Sharegpt);
    assert_eq!(s.truncation_mode, TruncationMode::KeepEnd);
    let e = parse(&["--lr_scheduler_type", "cosin"]).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("--lr_scheduler_type") && msg.contains("did you mean cosine"),
        "{msg}"
    );
}

#[test]
fn json_scheduler_kwargs() {
    let (_, _, s) = parse_ok(&[
        "--lr_scheduler_type",
        "cosine_with_min_lr",
        "--lr_scheduler_kwargs",
        r#"{"min_lr_rate": 0.1}"#,
    ]);
    assert_eq!(
        s.lr_scheduler_kwargs.get("min_lr_rate"),
        Some(&serde_json::json!(0.1))
    );
    let c = yaml("lr_scheduler_type: cosine\nlr_scheduler_kwargs:\n  num_cycles: 0.5\n");
    let (_, _, s) = parse_ok(&["--config", c.to_str().unwrap()]);
    assert_eq!(
        s.lr_scheduler_kwargs.get("num_cycles"),
        Some(&serde_json::json!(0.5))
    );
    let e = parse(&["--lr_scheduler_kwargs", "{num_cycles: 1}"]).unwrap_err();
    assert!(
        matches!(&e, ParseError::InvalidValue { field, .. } if field == "lr_scheduler_kwargs"),
        "{e}"
    );
    // cosine_with_min_lr without a floor is refused, naming the field.
    let e = parse(&["--lr_scheduler_type", "cosine_with_min_lr"]).unwrap_err();
    assert!(
        matches!(&e, ParseError::Invalid { error, .. } if error.field() == "lr_scheduler_kwargs"),
        "{e}"
    );
}

#[test]
fn special_spellings() {
    let (_, _, s) = parse_ok(&["--pad_to_multiple_of", "auto"]);
    assert_eq!(s.pad_to_multiple_of, None);
    let (_, _, s) = parse_ok(&["--pad_to_multiple_of", "64"]);
    assert_eq!(s.pad_to_multiple_of, Some(64));
    let (_, _, s) = parse_ok(&["--resume_from_checkpoint", "true"]);
    assert_eq!(s.resume_from(), Some(ResumeFrom::Latest));
    let c = yaml("resume_from_checkpoint: true\n");
    assert_eq!(
        parse_ok(&["--config", c.to_str().unwrap()]).2.resume_from(),
        Some(ResumeFrom::Latest)
    );
    let (_, _, s) = parse_ok(&["--resume_from_checkpoint", "out/checkpoint-500"]);
    assert_eq!(
        s.resume_from(),
        Some(ResumeFrom::Path("out/checkpoint-500".into()))
    );
}

#[test]
fn kebab_case_and_equals_forms() {
    let (m, _, s) = parse_ok(&[
        "--learning-rate",
        "1e-3",
        "--lora-alpha=64",
        "--per-device-train-batch-size=3",
    ]);
    assert_eq!(
        (s.learning_rate, m.lora_alpha, s.per_device_train_batch_size),
        (1e-3, 64, 3)
    );
    // `=` inside the value is kept.
    let (_, _, s) = parse_ok(&["--run_name=a=b"]);
    assert_eq!(s.run_name.as_deref(), Some("a=b"));
}

#[test]
fn max_seq_length_alias() {
    assert_eq!(
        parse_ok(&["--max_seq_length", "2048"]).2.max_length,
        Some(2048)
    );
    assert_eq!(parse_ok(&["--max-seq-length=128"]).2.max_length, Some(128));
    // Both given with the same value: fine; different values: an error naming both.
    assert_eq!(
        parse_ok(&["--max_seq_length", "256", "--max_length", "256"])
            .2
            .max_length,
        Some(256)
    );
    let e = parse(&["--max_seq_length", "512", "--max_length", "1024"]).unwrap_err();
    match &e {
        ParseError::AliasConflict { first, second, .. } => assert_eq!(
            (first.as_str(), second.as_str()),
            ("max_seq_length", "max_length")
        ),
        other => panic!("{other}"),
    }
    let c = yaml("max_seq_length: 512\nmax_length: 1024\n");
    let e = parse(&["--config", c.to_str().unwrap()]).unwrap_err();
    assert!(
        matches!(&e, ParseError::AliasConflict { origin: Origin::ConfigFile(p), .. } if p == &c),
        "{e}"
    );
    // Across layers the usual precedence applies: the flag wins over the file.
    let c = yaml("max_length: 1024\n");
    assert_eq!(
        parse_ok(&["--config", c.to_str().unwrap(), "--max_seq_length", "300"])
            .2
            .max_length,
        Some(300)
    );
    // torch_dtype is dtype's alias; activation_checkpointing gradient_checkpointing's.
    assert_eq!(
        parse_ok(&["--torch_dtype", "float16"]).0.dtype,
        TorchDtype::Float16
    );
    assert!(
        !parse_ok(&["--activation_checkpointing", "false"])
            .2
            .gradient_checkpointing
    );
    let c = yaml("torch_dtype: auto\n");
    assert_eq!(
        parse_ok(&["--config", c.to_str().unwrap()]).0.dtype,
        TorchDtype::Auto
    );
}

// ---------------------------------------------------------------- errors

#[test]
fn unknown_flag_suggests_the_closest_field() {
    let e = parse(&["--learnig_rate", "1e-4"]).unwrap_err();
    match &e {
        ParseError::UnknownFlag { flag, suggestion } => {
            assert_eq!(flag, "--learnig_rate");
            assert_eq!(suggestion.as_deref(), Some("--learning_rate"));
        }
        other => panic!("{other}"),
    }
    assert!(
        e.to_string().contains("did you mean `--learning_rate`?"),
        "{e}"
    );
    let e = parse(&["--lora-alpah", "8"]).unwrap_err();
    assert!(e.to_string().contains("--lora_alpha"), "{e}");
    let e = parse(&["--zzzzzzzzzz"]).unwrap_err();
    assert!(matches!(
        e,
        ParseError::UnknownFlag {
            suggestion: None,
            ..
        }
    ));
    // --no_ only applies to booleans.
    let e = parse(&["--no_learning_rate"]).unwrap_err();
    assert!(matches!(e, ParseError::UnknownFlag { .. }), "{e}");
}

#[test]
fn unknown_yaml_key_names_the_file() {
    let c = yaml("output_dir: out\nper_device_batch_size: 4\n");
    let e = parse(&["--config", c.to_str().unwrap()]).unwrap_err();
    match &e {
        ParseError::UnknownKey {
            path,
            key,
            suggestion,
        } => {
            assert_eq!(path, &c);
            assert_eq!(key, "per_device_batch_size");
            assert!(
                suggestion.as_deref().unwrap().starts_with("per_device_"),
                "{suggestion:?}"
            );
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(c.to_str().unwrap()), "{e}");
    // Kebab case is a flag spelling, not a YAML key.
    let c = yaml("learning-rate: 1e-4\n");
    let e = parse(&["--config", c.to_str().unwrap()]).unwrap_err();
    assert!(
        e.to_string().contains("did you mean `learning_rate`?"),
        "{e}"
    );
}

#[test]
fn wrong_types_name_the_flag_or_key() {
    let e = parse(&["--learning_rate", "abc"]).unwrap_err();
    match &e {
        ParseError::InvalidValue {
            origin,
            field,
            value,
            ..
        } => {
            assert_eq!(origin, &Origin::Cli("--learning_rate".into()));
            assert_eq!((field.as_str(), value.as_str()), ("learning_rate", "abc"));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("--learning_rate"), "{e}");
    assert!(matches!(
        parse(&["--per_device_train_batch_size", "2.5"]),
        Err(ParseError::InvalidValue { .. })
    ));
    assert!(matches!(
        parse(&["--per_device_train_batch_size", "-2"]),
        Err(ParseError::InvalidValue { .. })
    ));
    assert!(matches!(
        parse(&["--seed", "1e3"]),
        Err(ParseError::InvalidValue { .. })
    ));
    let c = yaml("num_train_epochs: three\n");
    let e = parse(&["--config", c.to_str().unwrap()]).unwrap_err();
    assert!(
        matches!(&e, ParseError::InvalidValue { origin: Origin::ConfigFile(p), field, .. } if p == &c && field == "num_train_epochs"),
        "{e}"
    );
    assert!(
        e.to_string().contains("num_train_epochs") && e.to_string().contains(c.to_str().unwrap()),
        "{e}"
    );
    let c = yaml("lora_target_modules: {q: 1}\n");
    assert!(matches!(
        parse(&["--config", c.to_str().unwrap()]),
        Err(ParseError::InvalidValue { .. })
    ));
}

#[test]
fn out_of_range_values_are_validation_errors_with_their_origin() {
    let e = parse(&["--lora_r", "0"]).unwrap_err();
    match &e {
        ParseError::Invalid { error, origin } => {
            assert_eq!(error.field(), "lora_r");
            assert_eq!(origin, &Origin::Cli("--lora_r".into()));
        }
        other => panic!("{other}"),
    }
    assert!(
        e.to_string().contains("lora_r") && e.to_string().contains("--lora_r"),
        "{e}"
    );

    let e = parse(&["--eval_steps", "1.5"]).unwrap_err();
    assert!(
        matches!(
            &e,
            ParseError::Invalid {
                error: ConfigError::Invalid {
                    field: "eval_steps",
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    let e = parse(&["--save_steps", "2.5"]).unwrap_err();
    assert!(
        matches!(&e, ParseError::Invalid { error, .. } if error.field() == "save_steps"),
        "{e}"
    );

    for (flags, field) in [
        (&["--learning_rate", "0"][..], "learning_rate"),
        (&["--learning_rate", "-1e-4"][..], "learning_rate"),
        (
            &["--per_device_train_batch_size", "0"][..],
            "per_device_train_batch_size",
        ),
        (
            &["--per_device_eval_batch_size", "0"][..],
            "per_device_eval_batch_size",
        ),
        (
            &["--gradient_accumulation_steps", "0"][..],
            "gradient_accumulation_steps",
        ),
        (&["--adam_beta1", "1.0"][..], "adam_beta1"),
        (&["--adam_beta2", "-0.1"][..], "adam_beta2"),
        (&["--save_total_limit", "0"][..], "save_total_limit"),
        (&["--lora_dropout", "1.5"][..], "lora_dropout"),
        (&["--max_steps", "0"][..], "max_steps"),
        (&["--warmup_steps", "-1"][..], "warmup_steps"),
        (&["--test_size", "2.5"][..], "test_size"),
        (&["--use_dora"][..], "use_dora"),
        (&["--load_in_8bit"][..], "load_in_8bit"),
        (
            &["--load_in_4bit", "--use_peft", "false"][..],
            "load_in_4bit",
        ),
        (&["--fp16"][..], "fp16"), // the tutorial sets bf16 true, so fp16 conflicts
        (
            &["--load_best_model_at_end", "--save_strategy", "epoch"][..],
            "load_best_model_at_end",
        ),
        (&["--max_length", "0"][..], "max_length"),
    ] {
        match parse(flags) {
            Err(ParseError::Invalid { error, .. }) => {
                assert_eq!(error.field(), field, "{flags:?}: {error}")
            }
            other => panic!("{flags:?}: expected a validation error on {field}, got {other:?}"),
        }
    }
    let e = parse(&["--use_dora"]).unwrap_err();
    assert!(
        e.to_string().contains("use_dora is not supported yet"),
        "{e}"
    );

    // From a YAML file the origin is the file.
    let c = yaml("lora_r: 0\n");
    match parse(&["--config", c.to_str().unwrap()]).unwrap_err() {
        ParseError::Invalid { error, origin } => {
            assert_eq!(error.field(), "lora_r");
            assert_eq!(origin, Origin::ConfigFile(c.clone()));
        }
        other => panic!("{other}"),
    }
    // load_best_model_at_end with matching strategies is accepted (eval 0.1, save 0.1).
    let (_, _, s) = parse_ok(&["--load_best_model_at_end"]);
    assert_eq!(s.resolved_metric_for_best_model().as_deref(), Some("loss"));
}

#[test]
fn missing_values() {
    for a in [
        &["--learning_rate"][..],
        &["--learning_rate", "--seed", "1"],
        &["--lora_target_modules"],
        &["--config"],
    ] {
        match parse(a) {
            Err(ParseError::MissingValue { flag }) => assert_eq!(flag, a[0]),
            other => panic!("{a:?}: {other:?}"),
        }
    }
}

#[test]
fn bad_arguments_and_files() {
    assert!(matches!(
        parse(&["train.py"]),
        Err(ParseError::UnexpectedArgument { .. })
    ));
    assert!(
        matches!(parse(&["--seed", "1", "2"]), Err(ParseError::UnexpectedArgument { arg }) if arg == "2")
    );
    assert!(matches!(
        parse(&["--"]),
        Err(ParseError::UnexpectedArgument { .. })
    ));
    assert!(matches!(
        parse(&["-x"]),
        Err(ParseError::UnexpectedArgument { .. })
    ));
    assert!(matches!(
        parse(&["--no_packing=true"]),
        Err(ParseError::InvalidValue { .. })
    ));

    let missing = std::env::temp_dir().join("trl_like_no_such_dir/none.yaml");
    let e = parse(&["--config", missing.to_str().unwrap()]).unwrap_err();
    assert!(
        matches!(&e, ParseError::ConfigFile { path, .. } if path == &missing),
        "{e}"
    );
    assert!(e.to_string().contains("none.yaml"), "{e}");

    let c = yaml("- a\n- b\n");
    assert!(matches!(
        parse(&["--config", c.to_str().unwrap()]),
        Err(ParseError::ConfigFile { .. })
    ));
    let c = yaml("learning_rate: [1\n");
    let e = parse(&["--config", c.to_str().unwrap()]).unwrap_err();
    assert!(
        matches!(&e, ParseError::ConfigFile { reason, .. } if reason.contains("invalid YAML")),
        "{e}"
    );
    let c = yaml("env: 3\n");
    assert!(matches!(
        parse(&["--config", c.to_str().unwrap()]),
        Err(ParseError::ConfigFile { .. })
    ));

    let c1 = yaml("seed: 1\n");
    let c2 = yaml("seed: 2\n");
    assert!(matches!(
        parse(&[
            "--config",
            c1.to_str().unwrap(),
            "--config",
            c2.to_str().unwrap()
        ]),
        Err(ParseError::RepeatedConfig { .. })
    ));
    // An empty file (or one with only comments) sets nothing.
    let c = yaml("# nothing here\n");
    assert_eq!(
        parse_ok(&["--config", c.to_str().unwrap()]),
        tutorial_defaults()
    );
}

#[test]
fn never_panics_on_odd_input() {
    // A deterministic shuffle of flags, values and junk: every outcome is Ok or Err.
    let words = [
        "--bf16",
        "--no-bf16",
        "true",
        "none",
        "--lora_r",
        "0",
        "-1",
        "1.5",
        "--eval_steps",
        "abc",
        "--",
        "--lora_target_modules",
        "q_proj",
        "--report_to",
        "--max_seq_length",
        "--max_length=",
        "=",
        "--=",
        "--learning_rate",
        "1e309",
        "--lr_scheduler_kwargs",
        "{",
        "--seed",
        "18446744073709551616",
        "--test_size",
        "nan",
        "--data_files",
        "",
        "--no_",
        "--no_config",
        "--config=",
        "\u{1F600}",
        "--dtype",
        "fp8",
    ];
    let mut state: u64 = 0x2545F4914F6CDD1D;
    let parser = tutorial_parser();
    for _ in 0..3000 {
        let mut a = Vec::new();
        for _ in 0..(state % 6) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            a.push(words[(state % words.len() as u64) as usize].to_string());
        }
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        let _ = parser.parse(&a);
    }
}

#[test]
fn yaml_nan_and_inf_are_refused_by_name_not_read_as_none() {
    // serde_json cannot hold NaN/inf: they used to arrive as null, i.e. "none".
    for (text, key, shown) in [
        ("learning_rate: .nan\n", "learning_rate", ".nan"),
        ("max_grad_norm: .inf\n", "max_grad_norm", ".inf"),
        ("eval_steps: -.inf\n", "eval_steps", "-.inf"), // optional: was silently unset
        ("max_length: .nan\n", "max_length", ".nan"),   // optional integer
    ] {
        let c = yaml(text);
        let e = parse(&["--config", c.to_str().unwrap()]).unwrap_err();
        match &e {
            ParseError::InvalidValue {
                origin: Origin::ConfigFile(p),
                field,
                value,
                ..
            } => {
                assert_eq!((p, field.as_str(), value.as_str()), (&c, key, shown), "{e}");
            }
            other => panic!("{text}: {other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(c.to_str().unwrap()) && msg.contains(key) && msg.contains(shown),
            "{msg}"
        );
        assert!(!msg.contains("none"), "{msg}");
    }
    let e = parse(&["--config", yaml("learning_rate: .nan\n").to_str().unwrap()]).unwrap_err();
    assert!(e.to_string().contains("finite number"), "{e}");
    // A string field keeps the spelling.
    let (_, _, s) = parse_ok(&["--config", yaml("run_name: .inf\n").to_str().unwrap()]);
    assert_eq!(s.run_name.as_deref(), Some(".inf"));
}

#[test]
fn origin_says_where_each_value_came_from() {
    let c = yaml("lora_r: 32\nlearning_rate: 1.0e-4\n");
    let parsed = tutorial_parser()
        .parse(&args(&[
            "--config",
            c.to_str().unwrap(),
            "--learning-rate",
            "3e-4",
            "--no_bf16",
            "--max_seq_length",
            "64",
        ]))
        .unwrap();
    assert_eq!(parsed.sft.learning_rate, 3e-4);
    assert_eq!(
        parsed.origin("learning_rate"),
        Origin::Cli("--learning_rate".into())
    );
    assert_eq!(parsed.origin("lora_r"), Origin::ConfigFile(c.clone()));
    assert_eq!(parsed.origin("bf16"), Origin::Cli("--no_bf16".into()));
    assert_eq!(
        parsed.origin("max_length"),
        Origin::Cli("--max_seq_length".into())
    );
    assert_eq!(parsed.origin("seed"), Origin::Default);
    assert!(parsed.is_explicit("lora_r") && !parsed.is_explicit("seed"));
}

#[test]
fn the_clap_command_holds_every_field_with_its_default() {
    let cmd = tutorial_parser().command();
    for f in ModelConfig::FIELDS
        .iter()
        .chain(DataArguments::FIELDS)
        .chain(SFTConfig::FIELDS)
    {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id().as_str() == f.name)
            .unwrap_or_else(|| panic!("no arg for {}", f.name));
        assert_eq!(arg.get_long(), Some(f.name));
        assert!(!arg.is_hide_set(), "{}", f.name);
    }
    let lr = cmd
        .get_arguments()
        .find(|a| a.get_id() == "learning_rate")
        .unwrap();
    assert_eq!(lr.get_default_values(), ["0.0005"]);
    // Ids and flag names are unique (clap checks this only in debug builds).
    let mut ids = std::collections::HashSet::new();
    let mut longs = std::collections::HashSet::new();
    for a in cmd.get_arguments() {
        assert!(ids.insert(a.get_id().to_string()), "{} twice", a.get_id());
        for l in a
            .get_long()
            .into_iter()
            .chain(a.get_all_aliases().unwrap_or_default())
        {
            assert!(longs.insert(l.to_string()), "--{l} twice");
        }
    }
}

// ---------------------------------------------------------------- env

#[test]
fn yaml_env_mapping() {
    let c = yaml("env:\n  TRL_LIKE_TEST_VAR_A: hello\n  TRL_LIKE_TEST_VAR_B: 3\nseed: 5\n");
    let parsed = tutorial_parser()
        .parse(&args(&["--config", c.to_str().unwrap()]))
        .unwrap();
    assert_eq!(
        parsed.env,
        [
            ("TRL_LIKE_TEST_VAR_A".to_string(), "hello".to_string()),
            ("TRL_LIKE_TEST_VAR_B".into(), "3".into())
        ]
    );
    assert_eq!(parsed.sft.seed, 5);
    assert_eq!(parsed.config_file.as_deref(), Some(c.as_path()));
    assert!(
        std::env::var("TRL_LIKE_TEST_VAR_A").is_err(),
        "parse() must not set variables"
    );
    parse_ok(&["--config", c.to_str().unwrap()]);
    assert_eq!(std::env::var("TRL_LIKE_TEST_VAR_A").as_deref(), Ok("hello"));
}

// ---------------------------------------------------------------- step arithmetic

#[test]
fn step_ratios_match_transformers() {
    // Expected values from transformers 5.23:
    //   TrainerState().compute_steps(TrainingArguments(eval_strategy="steps", eval_steps=e,
    //       logging_steps=l, save_steps=s), max_steps)   -> state.{eval,logging,save}_steps
    // i.e. math.ceil(max_steps * x) for x < 1, int(x) otherwise.
    for (max_steps, eval, logging, save, want) in [
        (1425, 0.1, 10.0, 0.1, (143, 10, 143)),
        (1430, 0.1, 0.01, 0.3, (143, 15, 429)),
        (7, 0.5, 0.33, 0.9, (4, 3, 7)),
        (100, 0.07, 0.001, 0.999, (8, 1, 100)), // 100 * 0.07 = 7.000000000000001 -> 8
        (3, 0.1, 10.0, 500.0, (1, 10, 500)),
        (1000, 0.3, 0.6, 0.15, (300, 600, 150)),
    ] {
        let (_, _, s) = parse_ok(&[
            "--eval_steps",
            &eval.to_string(),
            "--logging_steps",
            &logging.to_string(),
            "--save_steps",
            &save.to_string(),
        ]);
        let got = (
            s.resolved_eval_steps(max_steps),
            s.resolved_logging_steps(max_steps),
            s.resolved_save_steps(max_steps),
        );
        assert_eq!(
            got, want,
            "max_steps {max_steps}, eval {eval}, logging {logging}, save {save}"
        );
    }
    // eval_steps unset -> logging_steps (transformers: eval_steps = logging_steps = 0.05; ceil(1425*0.05) = 72).
    let (_, _, s) = parse_ok(&["--eval_steps", "none", "--logging_steps", "0.05"]);
    assert_eq!(
        (s.resolved_eval_steps(1425), s.resolved_logging_steps(1425)),
        (72, 72)
    );
}

#[test]
fn total_steps_and_warmup_match_transformers() {
    // max_steps = math.ceil(num_train_epochs * max(n // gas + int(n % gas > 0), 1))  (Trainer.set_initial_training_values)
    for (batches, gas, epochs, want) in [
        (2534, 1, 3.0, 7602),
        (2534, 4, 3.0, 1902),
        (10, 3, 2.5, 10),
        (1, 8, 1.0, 1),
        (475, 1, 3.0, 1425),
    ] {
        let s = SFTConfig {
            args: TrainingArguments {
                gradient_accumulation_steps: gas,
                num_train_epochs: epochs,
                ..SFTConfig::default().args
            },
            ..SFTConfig::default()
        };
        assert_eq!(
            s.total_training_steps(batches),
            want,
            "{batches} batches, gas {gas}, {epochs} epochs"
        );
    }
    let s = SFTConfig {
        args: TrainingArguments {
            max_steps: 50,
            ..SFTConfig::default().args
        },
        ..SFTConfig::default()
    };
    assert_eq!(s.total_training_steps(10_000), 50);

    // TrainingArguments(warmup_steps=w).get_warmup_steps(total):
    // int(w) if w >= 1 else math.ceil(total * w)
    for (w, total, want) in [
        (0.0, 1425, 0),
        (0.1, 1425, 143),
        (0.03, 1000, 30),
        (0.03, 1001, 31),
        (5.0, 1425, 5),
        (2.7, 100, 2),
        (0.5, 7, 4),
    ] {
        let (_, _, s) = parse_ok(&["--warmup_steps", &w.to_string()]);
        assert_eq!(
            s.get_warmup_steps(total),
            want,
            "warmup_steps {w}, total {total}"
        );
    }
    // The transformers-4 warmup_ratio: ceil(total * ratio); cannot be combined with warmup_steps.
    let (_, _, s) = parse_ok(&["--warmup_ratio", "0.03"]);
    assert_eq!(s.get_warmup_steps(1001), 31);
    let e = parse(&["--warmup_ratio", "0.1", "--warmup_steps", "10"]).unwrap_err();
    assert!(
        matches!(&e, ParseError::Invalid { error, .. } if error.field() == "warmup_ratio"),
        "{e}"
    );
}

// ---------------------------------------------------------------- help

#[test]
fn help_lists_every_field_with_its_default() {
    let parser = tutorial_parser();
    for flag in ["--help", "-h"] {
        let Err(ParseError::Help(text)) =
            parser.parse_args_and_config(&args(&["--seed", "1", flag]))
        else {
            panic!("{flag} should return the help text");
        };
        for f in ModelConfig::FIELDS
            .iter()
            .chain(DataArguments::FIELDS)
            .chain(SFTConfig::FIELDS)
        {
            assert!(
                text.contains(&format!("--{} ", f.name)),
                "help lacks --{}",
                f.name
            );
            for a in f.aliases {
                assert!(text.contains(&format!("--{a}")), "help lacks alias --{a}");
            }
        }
        for heading in [
            "Model arguments",
            "Data arguments",
            "Training arguments",
            "--config",
        ] {
            assert!(text.contains(heading), "help lacks {heading}");
        }
        // The application's defaults, not TRL's.
        assert!(text.contains("[default: ./weights/glm-4-9b-hf]"), "{text}");
        assert!(text.contains("[default: 0.0005]"));
        assert!(text.contains("[default: q_proj k_proj v_proj]"));
        assert!(text.contains("{linear,cosine,cosine_with_restarts,polynomial,constant,constant_with_warmup,cosine_with_min_lr}"));
    }
    assert_eq!(parser.help().lines().count(), {
        let Err(ParseError::Help(t)) = parser.parse(&args(&["--help"])) else {
            panic!()
        };
        t.lines().count()
    });
}

// ---------------------------------------------------------------- configs/*.yaml

#[test]
fn every_yaml_in_configs_parses() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .expect("configs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "demo.yaml")) // demo.yaml belongs to the demo
        // dpo*.yaml are `glm4 dpo` configs (DPOConfig): dpo_yaml_parses_with_the_dpo_parser.
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("dpo"))
        })
        // zero*.yaml are `--deepspeed` files (accelerate DEEPSPEED configs), parsed by
        // DeepSpeedConfig in config::deepspeed's tests and tests/zero.rs.
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("zero"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    for p in &files {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(
            text.starts_with("# "),
            "{} should start with a one-line comment",
            p.display()
        );
        let (m, d, s) = parse(&["--config", p.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e}"));
        let name = p.file_stem().unwrap().to_str().unwrap();
        assert_eq!(m.lora_r, 8, "{name}");
        if name == "toolcall" {
            // toolcall_train.py: its own data, 10 epochs, 128 tokens, eval/save every 20 %.
            assert_eq!(d.data_files, ["./data/glaive_toolcall_zh_1k.json"]);
            assert_eq!(d.dataset_format.as_str(), "sharegpt");
            assert_eq!(d.test_size, 0.1);
            assert_eq!(s.num_train_epochs, 10.0);
            assert_eq!(s.max_length, Some(128));
            assert_eq!((s.eval_steps, s.save_steps), (Some(0.2), 0.2));
            assert_eq!(s.output_dir, "./output/lora-glm4-9b-toolcall");
            continue;
        }
        // Settings no file changes stay at the tutorial's values.
        assert_eq!(d.data_files, ["./data/alpaca_gpt4_data_zh.json"], "{name}");
        assert_eq!(s.max_length, Some(512), "{name}");
        match name {
            "lora_alpaca_b1" | "lora_alpaca_b2" | "lora_alpaca_b4" | "lora_alpaca_b8" => {
                let b: usize = name.trim_start_matches("lora_alpaca_b").parse().unwrap();
                assert_eq!(s.per_device_train_batch_size, b, "{name}");
                assert_eq!(s.output_dir, format!("./output/lora-glm4-9b-alpaca_b{b}"));
                assert!(m.use_peft);
                assert_eq!(s.learning_rate, 5e-4);
            }
            "lora_alpaca_cosine" => {
                assert_eq!(s.lr_scheduler_type, SchedulerType::Cosine);
                assert_eq!(s.output_dir, "./output/lora-glm4-9b-alpaca_cosine");
                assert_eq!(s.warmup_steps, 0.03);
                assert_eq!(s.get_warmup_steps(1425), 43); // ceil(1425 * 0.03) = ceil(42.75)
                assert!(m.use_peft);
            }
            "alpaca_b1" | "alpaca_b2" | "alpaca_b4" => {
                let b: usize = name.trim_start_matches("alpaca_b").parse().unwrap();
                assert!(!m.use_peft, "{name}");
                assert_eq!(s.learning_rate, 5e-5, "{name}");
                assert_eq!(s.output_dir, format!("./output/glm4-9b-alpaca_b{b}"));
                // Effective batch b = 1 per device x b accumulation steps.
                assert_eq!(
                    (s.per_device_train_batch_size, s.gradient_accumulation_steps),
                    (1, b),
                    "{name}"
                );
                assert_eq!(s.total_train_batch_size(1), b);
                assert_eq!(
                    s.save_total_limit,
                    if b == 1 { None } else { Some(5) },
                    "{name}"
                );
            }
            "no_peft" => {
                assert!(!m.use_peft);
                assert_eq!(s.learning_rate, 5e-5);
                assert_eq!(s.output_dir, "./output/glm4-9b-toolcall");
            }
            "tutorial" => {
                // Writes out exactly the application defaults.
                assert_eq!(
                    (m, d, s),
                    tutorial_defaults(),
                    "tutorial.yaml drifted from the tutorial's defaults"
                );
                // ... and gives the same result on top of TRL's own defaults.
                let (m2, d2, s2) = TrlParser::default()
                    .parse_args_and_config(&args(&["--config", p.to_str().unwrap()]))
                    .unwrap();
                assert_eq!((m2, d2, s2), tutorial_defaults());
            }
            other => panic!("configs/{other}.yaml has no test: add its key values here"),
        }
    }
}

// ---------------------------------------------------------------- DPOConfig

fn dpo_parser() -> TrlParser<ModelConfig, DataArguments, DPOConfig> {
    TrlParser::new(
        ModelConfig::default(),
        DataArguments::default(),
        DPOConfig::default(),
    )
}

#[test]
fn dpo_fields_parse_from_yaml_and_flags() {
    let p = yaml(
        "learning_rate: 5.0e-6\nbeta: 0.2\nloss_type: [sigmoid, sft]\nloss_weights: [0.8, 0.2]\n\
         f_divergence_type: js_divergence\npad_to_multiple_of: auto\n",
    );
    let (_, _, c) = dpo_parser()
        .parse_args_and_config(&args(&[
            "--config",
            p.to_str().unwrap(),
            "--max_length",
            "256",
            "--no_disable_dropout",
        ]))
        .unwrap();
    assert_eq!(
        (c.learning_rate, c.beta, c.max_length),
        (5e-6, 0.2, Some(256))
    );
    assert_eq!(c.loss_type, ["sigmoid", "sft"]);
    assert_eq!(c.loss_weights, Some(vec![0.8, 0.2]));
    assert_eq!(c.f_divergence_type, FDivergenceType::JsDivergence);
    assert_eq!(c.pad_to_multiple_of, None);
    assert!(!c.disable_dropout);
    // A list of numbers on the command line; a single number is a one-item list.
    let (_, _, c) = dpo_parser()
        .parse_args_and_config(&args(&["--loss_type", "hinge", "--loss_weights", "2"]))
        .unwrap();
    assert_eq!(
        (c.loss_type.clone(), c.loss_weights),
        (vec!["hinge".to_string()], Some(vec![2.0]))
    );
    let e = dpo_parser()
        .parse_args_and_config(&args(&["--loss_weights", "1", "x"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss_weights"), "{e}");
}

#[test]
fn dpo_bad_values_name_the_field_and_where_it_came_from() {
    let p = yaml("beta: 0\n");
    let e = dpo_parser()
        .parse_args_and_config(&args(&["--config", p.to_str().unwrap()]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("beta") && e.contains("run.yaml") && e.contains("> 0"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let e = dpo_parser()
        .parse_args_and_config(&args(&["--sync_ref_model"]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sync_ref_model") && e.contains("not implemented"),
        "{e}"
    );
    let e = dpo_parser()
        .parse_args_and_config(&args(&["--loss_type", "dpo"]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss_type") && e.contains("sigmoid"), "{e}");
}
