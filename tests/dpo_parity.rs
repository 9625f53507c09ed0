//! `DPOTrainer` against TRL 1.16 + PEFT 0.21 on the tiny GLM-4 (fp32, CPU),
//! from `scripts/make_dpo_fixtures.py`:
//!
//! - the tokenized pairs (prompt / chosen / rejected ids) for conversational,
//!   standard, implicit-prompt and sharegpt preference data, and the
//!   collator's truncation;
//! - 4 optimizer steps with LoRA (batch 2 × accumulation 2) for the sigmoid,
//!   ipo and hinge losses from an adapter with trained-looking weights (TRL's
//!   reference: a frozen copy of it; ours: its log-probabilities precomputed),
//!   and sigmoid from a fresh adapter (reference: adapters disabled): every
//!   logged metric and the final adapter.

use glm4::glm::GlmForCausalLM;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use trl_like::config::{
    DPOConfig, IntervalStrategy, SamplingStrategy, SaveStrategy, TrainingArguments, TruncationMode,
};
use trl_like::data::preference::{
    drop_pairs_without_completion, tokenize_preference_dataset, TokenizedPair,
};
use trl_like::data::{Dataset, Origin, Record};
use trl_like::modeling::PreTrainedModel;
use trl_like::peft::PeftAdapter;
use trl_like::trainer::dpo::Reference;
use trl_like::trainer::{DPOTrainer, TrainingHooks};

mod common;
use common::close;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(path: &str) -> Value {
    let p = root().join("tests/fixtures/dpo").join(path);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn dataset(records: &[Value], file: &str) -> Dataset {
    Dataset {
        records: records
            .iter()
            .enumerate()
            .map(|(index, v)| Record {
                value: v.clone(),
                origin: Origin {
                    file: file.into(),
                    index,
                    line: None,
                },
            })
            .collect(),
    }
}

fn ids(v: &Value) -> Vec<i64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn tokenizer() -> trl_like::tokenizer::PreTrainedTokenizer {
    glm4::load_tokenizer(&root().join("weights/tiny-glm")).unwrap()
}

#[test]
fn tokenized_pairs_match_trl_for_every_layout() {
    let fx = fixture("tokenize.json");
    let tok = tokenizer();
    for layout in [
        "conversational",
        "standard",
        "implicit_conversational",
        "implicit_standard",
        "sharegpt",
    ] {
        let records = fx["records"][layout].as_array().unwrap();
        let (_, pairs) = tokenize_preference_dataset(&dataset(records, "pairs.json"), &tok)
            .unwrap_or_else(|e| panic!("{layout}: {e}"));
        let expected = fx["expected"][layout].as_array().unwrap();
        assert_eq!(pairs.len(), expected.len(), "{layout}");
        for (i, (p, e)) in pairs.iter().zip(expected).enumerate() {
            assert_eq!(
                p.prompt_ids,
                ids(&e["prompt_ids"]),
                "{layout} pair {i}: prompt_ids"
            );
            assert_eq!(
                p.chosen_ids,
                ids(&e["chosen_ids"]),
                "{layout} pair {i}: chosen_ids"
            );
            assert_eq!(
                p.rejected_ids,
                ids(&e["rejected_ids"]),
                "{layout} pair {i}: rejected_ids"
            );
        }
    }
}

#[test]
fn truncation_and_dropped_pairs_match_trl() {
    let fx = fixture("tokenize.json");
    let tok = tokenizer();
    let records = fx["records"]["conversational"].as_array().unwrap();
    let (_, pairs) = tokenize_preference_dataset(&dataset(records, "pairs.json"), &tok).unwrap();
    for (name, mode) in [
        ("truncation_keep_start", TruncationMode::KeepStart),
        ("truncation_keep_end", TruncationMode::KeepEnd),
    ] {
        let e = &fx["expected"][name];
        let max = e["max_length"].as_u64().unwrap() as usize;
        let (kept, _) = drop_pairs_without_completion(pairs.clone(), Some(max), mode);
        let want: Vec<Vec<i64>> = e["kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| ids(&k["prompt_ids"]))
            .collect();
        let got: Vec<Vec<i64>> = kept.iter().map(|p| p.prompt_ids.clone()).collect();
        assert_eq!(got, want, "{name}: kept pairs");
        let args = DPOConfig {
            max_length: Some(max),
            truncation_mode: mode,
            ..DPOConfig::default()
        };
        let hooks =
            trl_like::trainer::DPOHooks::new(&args, &tok, Reference::DisabledAdapters).unwrap();
        let refs: Vec<&TokenizedPair> = kept.iter().collect();
        let batch = <trl_like::trainer::DPOHooks as TrainingHooks<GlmForCausalLM>>::collate(
            &hooks,
            &refs,
            Device::Cpu,
        );
        let rows = |t: &Tensor| -> Vec<Vec<i64>> { Vec::<Vec<i64>>::try_from(t).unwrap() };
        let want = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(e[k].clone()).unwrap() };
        assert_eq!(
            rows(&batch.input_ids),
            want("input_ids"),
            "{name}: input_ids"
        );
        assert_eq!(
            rows(&batch.attention_mask),
            want("attention_mask"),
            "{name}"
        );
        assert_eq!(
            rows(&batch.completion_mask),
            want("completion_mask"),
            "{name}"
        );
    }
}

fn args(output_dir: &Path, loss_type: &str) -> DPOConfig {
    DPOConfig {
        args: TrainingArguments {
            output_dir: output_dir.display().to_string(),
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 2,
            learning_rate: 5e-4,
            max_grad_norm: 1.0,
            logging_steps: 1.0,
            max_steps: 4,
            seed: 42,
            bf16: Some(false),
            gradient_checkpointing: false,
            report_to: vec!["none".into()],
            save_strategy: SaveStrategy::No,
            eval_strategy: IntervalStrategy::No,
            train_sampling_strategy: SamplingStrategy::Sequential,
            disable_tqdm: true,
            ..DPOConfig::default().args
        },
        loss_type: vec![loss_type.into()],
        beta: 0.1,
        max_length: Some(64),
        ..DPOConfig::default()
    }
}

const LOGGED: [&str; 14] = [
    "loss",
    "grad_norm",
    "learning_rate",
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
];

/// Trains 4 steps as the fixture did (with the fixture's adapter, or full
/// fine-tuning at `full_learning_rate`) and checks every logged metric;
/// returns the trainer and the worst relative metric error.
fn train_and_compare(
    setting: &str,
    loss_type: &str,
    recompute: bool,
    full_learning_rate: Option<f64>,
    padding_free: bool,
) -> (DPOTrainer<GlmForCausalLM>, f64) {
    let tiny = root().join("weights/tiny-glm");
    let mut model = GlmForCausalLM::from_pretrained(&tiny, Some(Kind::Float), Device::Cpu).unwrap();
    let all: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(root().join("data/demo_dpo.json")).unwrap())
            .unwrap();
    let data = dataset(&all[..16], "demo_dpo.json");
    let out = std::env::temp_dir().join(format!(
        "glm4-dpo-parity-{setting}-{recompute}-{padding_free}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let mut a = args(&out, loss_type);
    a.gradient_checkpointing = recompute;
    a.padding_free = padding_free;
    let builder = match full_learning_rate {
        Some(lr) => {
            a.learning_rate = lr;
            DPOTrainer::builder(model, a)
        }
        None => {
            let init = root()
                .join("tests/fixtures/dpo")
                .join(setting)
                .join("adapter_init");
            let adapter = PeftAdapter::load(&mut model, &init, Device::Cpu, true).unwrap();
            DPOTrainer::builder(model, a).peft_model(adapter)
        }
    };
    let mut trainer = builder
        .train_dataset(&data)
        .processing_class(tokenizer())
        .build()
        .unwrap();
    trainer.train().unwrap();
    let _ = std::fs::remove_dir_all(&out);

    let expected = fixture(&format!("{setting}/log_history.json"));
    let expected = expected.as_array().unwrap();
    let got = &trainer.state.log_history;
    assert_eq!(got.len(), expected.len(), "{setting}: log entries");
    let mut worst: f64 = 0.0;
    for (step, (g, e)) in got.iter().zip(expected).take(4).enumerate() {
        for key in LOGGED {
            let (gv, ev) = (
                g[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{setting}: no {key} in {g:?}")),
                e[key].as_f64().unwrap(),
            );
            worst = worst.max((gv - ev).abs() / (1.0 + ev.abs()));
            assert!(
                close(gv, ev, 1e-5),
                "{setting} step {}: {key} {gv} vs TRL {ev}",
                step + 1
            );
        }
        assert_eq!(g["epoch"].as_f64(), e["epoch"].as_f64(), "{setting}");
    }
    let (gl, el) = (
        got[4]["train_loss"].as_f64().unwrap(),
        expected[4]["train_loss"].as_f64().unwrap(),
    );
    assert!(close(gl, el, 1e-5), "{setting}: train_loss {gl} vs {el}");
    (trainer, worst)
}

/// [`train_and_compare`] with the fixture's adapter, then the final adapter
/// against PEFT's; returns the worst metric error and adapter difference.
fn check_setting(setting: &str, loss_type: &str, recompute: bool) -> (f64, f64) {
    check_setting_with(setting, loss_type, recompute, false)
}

fn check_setting_with(
    setting: &str,
    loss_type: &str,
    recompute: bool,
    padding_free: bool,
) -> (f64, f64) {
    let (trainer, worst) = train_and_compare(setting, loss_type, recompute, None, padding_free);

    let file = root()
        .join("tests/fixtures/dpo")
        .join(setting)
        .join("adapter_final/adapter_model.safetensors");
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .collect();
    let ours = trainer.peft.as_ref().unwrap().named_parameters();
    assert_eq!(ours.len(), reference.len());
    let mut worst_w: f64 = 0.0;
    for (name, t) in ours {
        let diff = (&t - &reference[&name]).abs().max().double_value(&[]);
        worst_w = worst_w.max(diff);
        assert!(
            diff < 1e-5,
            "{setting}: {name} differs from PEFT's by {diff}"
        );
    }
    eprintln!("{setting}: worst metric error {worst:.2e}, worst adapter difference {worst_w:.2e}");
    (worst, worst_w)
}

#[test]
fn sigmoid_matches_trl() {
    check_setting("sigmoid_b2_ga2", "sigmoid", false);
}

#[test]
fn ipo_matches_trl() {
    check_setting("ipo_b2_ga2", "ipo", false);
}

#[test]
fn hinge_matches_trl() {
    check_setting("hinge_b2_ga2", "hinge", false);
}

/// A fresh adapter: the reference is the base with adapters switched off at
/// every step (no precomputation, no copy); with activation recompute too.
#[test]
fn fresh_adapter_with_disabled_adapters_reference_matches_trl() {
    check_setting("sigmoid_b2_ga2_fresh", "sigmoid", false);
    check_setting("sigmoid_b2_ga2_fresh", "sigmoid", true);
}

/// Full fine-tuning: TRL keeps a frozen copy of the model as the reference;
/// here its log-probabilities are precomputed before training (no copy).
#[test]
fn full_fine_tuning_matches_trl() {
    let setting = "full_sigmoid_b2_ga2";
    let (trainer, worst) = train_and_compare(setting, "sigmoid", false, Some(1e-4), false);
    let file = root()
        .join("tests/fixtures/dpo")
        .join(setting)
        .join("final_weights.safetensors");
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(file)
        .unwrap()
        .into_iter()
        .collect();
    assert!(reference.len() >= 5);
    let ours: std::collections::HashMap<String, Tensor> =
        trainer.model.named_parameters().into_iter().collect();
    let mut worst_w: f64 = 0.0;
    for (name, want) in &reference {
        let diff = (&ours[name] - want).abs().max().double_value(&[]);
        if name.ends_with("k_proj.bias") {
            // On the half of each head that rotary passes through, the key
            // bias adds the same q·b_k to every score of a row, which softmax
            // ignores: those gradients are zero in exact arithmetic, and Adam
            // scales their rounding noise up to lr-sized steps in both runs.
            // Only the bound of 4 Adam steps (lr 1e-4) is meaningful there.
            assert!(diff <= 4.0 * 1e-4 * 1.01, "{setting}: {name} moved {diff}");
            continue;
        }
        worst_w = worst_w.max(diff);
        assert!(
            diff < 1e-5,
            "{setting}: {name} differs from TRL's by {diff}"
        );
    }
    eprintln!("{setting}: worst metric error {worst:.2e}, worst weight difference {worst_w:.2e}");
}

/// Padding-free batches (all sequences of a micro-batch in one row, attention
/// kept within each) give TRL's padded results, for a precomputed and an
/// adapters-disabled reference, and for IPO's length normalisation.
#[test]
fn padding_free_matches_trl() {
    check_setting_with("sigmoid_b2_ga2", "sigmoid", false, true);
    check_setting_with("ipo_b2_ga2", "ipo", false, true);
    check_setting_with("sigmoid_b2_ga2_fresh", "sigmoid", true, true);
}
