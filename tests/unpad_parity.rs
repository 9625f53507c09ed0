//! Padded batches computed on their real tokens only (`unpad_batches`, on by
//! default) against dense padded compute (`--unpad_batches false`), on the
//! tiny GLM-4 in fp32: the same loss, entropy, token accuracy, num_tokens,
//! gradients (LoRA dropout on: the masks are drawn as the dense pass draws
//! them), evaluation metrics and total_flos within 1e-6, and the trained
//! adapters.
//! The TRL parity tests (tests/trainer_parity.rs) run the default, unpadded.

use glm4::glm::GlmForCausalLM;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};
use trl_like::config::{
    IntervalStrategy, SFTConfig, SamplingStrategy, SaveStrategy, TrainingArguments,
};
use trl_like::data::{Dataset, Origin, Record};
use trl_like::modeling::Checkpointable;
use trl_like::peft::{LoraConfig, TargetModules};
use trl_like::trainer::{SFTHooks, SFTTrainer, TrainingHooks};

mod common;
use common::close;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The 16 tokenized records of the padded-batch TRL fixture (lengths vary, so
/// every batch of 4 has padding).
fn records() -> Dataset {
    let p = root().join("tests/fixtures/trainer/b4/batches.json");
    let batches: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut records = Vec::new();
    for mb in batches["micro_batches"].as_array().unwrap() {
        let ids: Vec<Vec<i64>> = serde_json::from_value(mb["input_ids"].clone()).unwrap();
        let mask: Vec<Vec<i64>> = serde_json::from_value(mb["attention_mask"].clone()).unwrap();
        for (ids, mask) in ids.iter().zip(&mask) {
            let n = mask.iter().filter(|&&m| m == 1).count();
            let index = records.len();
            records.push(Record {
                value: json!({"input_ids": &ids[..n]}),
                origin: Origin {
                    file: "batches.json".into(),
                    index,
                    line: None,
                },
            });
        }
    }
    Dataset { records }
}

fn args(tag: &str, unpad: bool) -> SFTConfig {
    SFTConfig {
        args: TrainingArguments {
            output_dir: std::env::temp_dir()
                .join(format!("glm4-unpad-{tag}-{unpad}-{}", std::process::id()))
                .display()
                .to_string(),
            per_device_train_batch_size: 4,
            per_device_eval_batch_size: 3,
            gradient_accumulation_steps: 2,
            learning_rate: 5e-4,
            logging_steps: 1.0,
            max_steps: 2,
            bf16: Some(false),
            gradient_checkpointing: false,
            report_to: vec!["none".into()],
            save_strategy: SaveStrategy::No,
            eval_strategy: IntervalStrategy::Steps,
            eval_steps: Some(1.0),
            train_sampling_strategy: SamplingStrategy::Sequential,
            disable_tqdm: true,
            ..SFTConfig::default().args
        },
        max_length: Some(64),
        unpad_batches: unpad,
        ..SFTConfig::default()
    }
}

/// LoRA with dropout on every linear layer of the blocks (q/k/v/o, MLP).
fn lora() -> LoraConfig {
    LoraConfig::new(8, 32.0, 0.1, TargetModules::AllLinear)
}

fn trainer(tag: &str, unpad: bool, dataset: &Dataset) -> SFTTrainer<GlmForCausalLM> {
    let tiny = root().join("weights/tiny-glm");
    let model = GlmForCausalLM::from_pretrained(&tiny, Some(Kind::Float), Device::Cpu).unwrap();
    SFTTrainer::builder(model, args(tag, unpad))
        .peft_config(Some(lora()))
        .train_dataset(dataset)
        .eval_dataset(dataset)
        .processing_class(glm4::load_tokenizer(&tiny).unwrap())
        .build()
        .unwrap()
}

/// The tests seed and draw from libtorch's one global generator (dropout):
/// they must not run at the same time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn assert_close(what: &str, got: f64, want: f64) {
    assert!(
        close(got, want, 1e-6),
        "{what}: unpadded {got} vs dense {want}"
    );
}

/// One padded batch through the hooks both ways, from the same seed: the
/// loss, metrics, num_tokens and every adapter gradient agree.
fn check_one_batch(recompute: bool) {
    let _serial = serial();
    let dataset = records();
    let mut t = trainer("hooks", true, &dataset);
    t.model.set_activation_checkpointing(recompute);
    let params = t.peft.as_ref().unwrap().named_parameters();
    // B starts at zero (no gradient for A): give it values so both get one.
    tch::no_grad(|| {
        tch::manual_seed(3);
        for (name, p) in &params {
            if name.contains("lora_B") {
                let _ = p.shallow_clone().normal_(0.0, 0.05);
            }
        }
    });
    let rows: Vec<_> = t.train_dataset[4..8].iter().collect();
    let batch = <SFTHooks as TrainingHooks<GlmForCausalLM>>::collate(&t.hooks, &rows, Device::Cpu);
    assert!(
        trl_like::data::unpad::unpad(&batch).is_some(),
        "the batch must be padded (and so unpadded) for the test to mean anything"
    );
    let mut results = Vec::new();
    for unpad in [true, false] {
        t.hooks.unpad = unpad;
        tch::manual_seed(11);
        let out = t
            .hooks
            .compute_loss(&t.model, &batch, Some(57), true)
            .unwrap();
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().copy()).collect();
        for (_, p) in &params {
            let _ = p.grad().zero_();
        }
        let eval = t.hooks.compute_loss(&t.model, &batch, None, false).unwrap();
        results.push((out, grads, eval));
    }
    let (unpadded, dense) = (&results[0], &results[1]);
    assert_close("loss", unpadded.0.loss, dense.0.loss);
    assert_eq!(unpadded.0.num_tokens, dense.0.num_tokens);
    for ((name, a), (_, b)) in unpadded.0.metrics.iter().zip(&dense.0.metrics) {
        assert_close(name, *a, *b);
    }
    let mut worst: f64 = 0.0;
    for ((name, _), (a, b)) in params.iter().zip(unpadded.1.iter().zip(&dense.1)) {
        assert!(b.abs().max().double_value(&[]) > 0.0, "{name}: no gradient");
        let err = (a - b).abs().max().double_value(&[]);
        let scale = 1.0 + b.abs().max().double_value(&[]);
        worst = worst.max(err / scale);
        assert!(err <= 1e-6 * scale, "{name}: gradients differ by {err}");
    }
    eprintln!("recompute {recompute}: worst relative gradient difference {worst:.2e}");
    assert_close("eval loss", unpadded.2.loss, dense.2.loss);
    for ((name, a), (_, b)) in unpadded.2.metrics.iter().zip(&dense.2.metrics) {
        assert_close(name, *a, *b);
    }
}

#[test]
fn one_padded_batch_unpadded_equals_dense() {
    check_one_batch(false);
}

#[test]
fn one_padded_batch_unpadded_equals_dense_with_recompute() {
    check_one_batch(true);
}

/// Two optimizer steps (batch 4 × accumulation 2, LoRA dropout 0.1) with an
/// evaluation after each: every logged number and the final adapter agree.
#[test]
fn training_and_evaluation_report_what_dense_compute_reports() {
    let _serial = serial();
    let dataset = records();
    let mut runs = Vec::new();
    for unpad in [true, false] {
        let mut t = trainer("train", unpad, &dataset);
        t.train().unwrap();
        let _ = std::fs::remove_dir_all(&t.args.output_dir);
        runs.push(t);
    }
    let (unpadded, dense) = (&runs[0], &runs[1]);
    let (a, b) = (&unpadded.state.log_history, &dense.state.log_history);
    assert_eq!(a.len(), b.len());
    let mut compared = 0;
    for (ea, eb) in a.iter().zip(b) {
        let keys: Vec<&String> = ea.keys().collect();
        assert_eq!(keys, eb.keys().collect::<Vec<_>>());
        for (key, va) in ea {
            if key.contains("runtime") || key.contains("per_second") {
                continue;
            }
            match (va.as_f64(), eb[key].as_f64()) {
                (Some(x), Some(y)) if key.contains("num_tokens") || key == "step" => {
                    assert_eq!(x, y, "{key}")
                }
                (Some(x), Some(y)) => {
                    assert_close(key, x, y);
                    compared += 1;
                }
                _ => assert_eq!(va, &eb[key], "{key}"),
            }
        }
    }
    assert!(compared >= 10, "only {compared} numbers compared");
    assert!(a.iter().any(|e| e.contains_key("eval_loss")));
    assert_eq!(unpadded.state.total_flos, dense.state.total_flos);
    let pa = unpadded.peft.as_ref().unwrap().named_parameters();
    let pb = dense.peft.as_ref().unwrap().named_parameters();
    // AdamW's first steps move each weight by about lr · g / |g|: where a
    // gradient is within rounding of 0 its sign is rounding, so the weights
    // are compared at a fiftieth of the learning rate (the gradients
    // themselves agree within 1e-6, checked above on one batch).
    for ((name, x), (_, y)) in pa.iter().zip(&pb) {
        let err = (x - y).abs().max().double_value(&[]);
        assert!(err <= 1e-5, "{name}: trained adapters differ by {err}");
    }
}
