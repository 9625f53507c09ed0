//! QLoRA: `SFTTrainer` with LoRA on a 4-bit base against TRL 1.16 + PEFT 0.21 +
//! bitsandbytes 0.50 (transformers' `BitsAndBytesConfig(load_in_4bit=True)`, fp32 compute).
//!
//! `scripts/make_qlora_fixtures.py` trained from tests/fixtures/trainer/b4/adapter_init on
//! the 4-bit tiny GLM with the mechanism of `scripts/make_trainer_fixtures.py` (batch 4,
//! no shuffling, every micro-batch recorded). We quantize weights/tiny-glm while loading,
//! feed the same batches and expect the same losses, gradient norms, learning rates and
//! final adapter (bf16, as TRL keeps a quantized base's adapters); the adapter we save then
//! decodes PEFT's greedy tokens on a 4-bit base.

use glm4::glm::GlmForCausalLM;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};
use trl_like::config::{
    IntervalStrategy, SFTConfig, SamplingStrategy, SaveStrategy, TrainingArguments,
};
use trl_like::data::{Dataset, Origin, Record};
use trl_like::peft::PeftAdapter;
use trl_like::quant::{Quant4bitConfig, QuantType};
use trl_like::trainer::SFTTrainer;

mod common;
use common::{check_log_history, close};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(setting: &str, file: &str) -> Value {
    let p = root()
        .join("tests/fixtures/trainer")
        .join(setting)
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The micro-batches TRL trained on, unpadded back into records.
fn records_from_batches(batches: &Value) -> Dataset {
    let mut records = Vec::new();
    for mb in batches["micro_batches"].as_array().unwrap() {
        let ids: Vec<Vec<i64>> = serde_json::from_value(mb["input_ids"].clone()).unwrap();
        let mask: Vec<Vec<i64>> = serde_json::from_value(mb["attention_mask"].clone()).unwrap();
        let labels: Vec<Vec<i64>> = serde_json::from_value(mb["labels"].clone()).unwrap();
        for ((ids, mask), labels) in ids.iter().zip(&mask).zip(&labels) {
            let n = mask.iter().filter(|&&m| m == 1).count();
            let index = records.len();
            records.push(Record {
                value: json!({"input_ids": &ids[..n], "labels": &labels[..n]}),
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

fn args(output_dir: &Path, recompute: bool) -> SFTConfig {
    SFTConfig {
        args: TrainingArguments {
            output_dir: output_dir.display().to_string(),
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 5e-4,
            max_grad_norm: 1.0,
            logging_steps: 1.0,
            max_steps: 4,
            seed: 42,
            bf16: Some(false),
            gradient_checkpointing: recompute,
            report_to: vec!["none".into()],
            save_strategy: SaveStrategy::No,
            eval_strategy: IntervalStrategy::No,
            train_sampling_strategy: SamplingStrategy::Sequential,
            disable_tqdm: true,
            ..SFTConfig::default().args
        },
        max_length: Some(64),
        ..SFTConfig::default()
    }
}

/// TRL keeps a quantized base's adapters in bf16, so the final adapter is bf16 on both
/// sides: the backward passes agree to fp32 rounding (the log history above, 1e-5), which
/// can flip the bf16 rounding of an update. Each element must be within 1e-5 of PEFT's, or
/// where bf16 cannot resolve 1e-5 (|w| > 2^-10), one bf16 step (2^-8 relative); and such
/// flips must stay rare.
fn check_bf16_adapter(setting: &str, ours: Vec<(String, tch::Tensor)>) {
    let file = root()
        .join("tests/fixtures/trainer")
        .join(setting)
        .join("adapter_final/adapter_model.safetensors");
    let reference: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(file)
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(ours.len(), reference.len());
    let (mut flipped, mut total) = (0i64, 0i64);
    for (name, t) in ours {
        let r = &reference[&name];
        assert_eq!(
            (t.kind(), r.kind()),
            (Kind::BFloat16, Kind::BFloat16),
            "{name}"
        );
        let (t, r) = (t.to_kind(Kind::Float), r.to_kind(Kind::Float));
        let diff = (&t - &r).abs();
        // One bf16 step at r's magnitude: 2^(exponent - 7).
        let step = (r.abs().clamp_min(1e-30).log2().floor() - 7.0).exp2();
        let over = diff
            .gt_tensor(&step.clamp_min(1e-5))
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(
            over, 0,
            "{setting}: {name} differs from PEFT's by more than max(1e-5, one bf16 step)"
        );
        flipped += diff.gt(0.0).sum(Kind::Int64).int64_value(&[]);
        total += t.numel() as i64;
    }
    eprintln!("{setting}: {flipped}/{total} adapter elements differ from PEFT's (within max(1e-5, one bf16 step))");
    assert!(
        flipped * 50 < total,
        "{setting}: {flipped}/{total} elements differ from PEFT's"
    );
}

/// Records in the dataset TRL trained on (the first 16 of data/demo_alpaca.json).
const TRL_RECORDS: f64 = 16.0;

fn check_qlora(setting: &str, quant_type: QuantType, nested: bool, recompute: bool) {
    let tiny = root().join("weights/tiny-glm");
    let cfg = Quant4bitConfig { quant_type, nested };
    let mut model =
        GlmForCausalLM::from_pretrained_quantized(&tiny, Some(Kind::Float), Device::Cpu, Some(cfg))
            .unwrap();
    let init = root().join("tests/fixtures/trainer/b4/adapter_init");
    let adapter = PeftAdapter::load(&mut model, &init, Device::Cpu, true).unwrap();
    let tokenizer = glm4::load_tokenizer(&tiny).unwrap();
    let dataset = records_from_batches(&fixture(setting, "batches.json"));
    let n_records = dataset.len();
    let out = std::env::temp_dir().join(format!(
        "glm4-qlora-{setting}-{recompute}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let mut trainer = SFTTrainer::builder(model, args(&out, recompute))
        .peft_model(adapter)
        .train_dataset(&dataset)
        .processing_class(tokenizer)
        .build()
        .unwrap();
    trainer.train().unwrap();

    let expected = fixture(setting, "log_history.json");
    check_log_history(
        setting,
        &trainer.state.log_history,
        expected.as_array().unwrap(),
        |ours, trl| close(ours * n_records as f64, trl * TRL_RECORDS, 1e-12),
    );
    check_bf16_adapter(setting, trainer.peft.as_ref().unwrap().named_parameters());

    if recompute {
        return;
    }
    // The adapter we save, on a freshly quantized base, decodes PEFT's greedy tokens.
    let saved = out.join("adapter");
    trainer
        .peft
        .as_ref()
        .unwrap()
        .save_pretrained(&saved)
        .unwrap();
    let greedy = fixture(setting, "greedy.json");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_glm4"));
    cmd.args([
        "generate",
        "--model_name_or_path",
        "weights/tiny-glm",
        "--adapter_path",
    ])
    .arg(&saved)
    .args([
        "--load_in_4bit",
        "--bnb_4bit_quant_type",
        quant_type.as_str(),
    ])
    .args([
        "--use_bnb_nested_quant",
        if nested { "true" } else { "false" },
    ])
    .args([
        "--prompt",
        greedy["prompt"].as_str().unwrap(),
        "--max_new_tokens",
        "12",
        "--json",
    ]);
    let run = cmd.current_dir(root()).output().expect("glm4 runs");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got: Value = serde_json::from_slice(&run.stdout).expect("one JSON object");
    let ids = |v: &Value| -> Vec<i64> { serde_json::from_value(v.clone()).unwrap() };
    let prompt = ids(&greedy["input_ids"]);
    assert_eq!(ids(&got["prompt_ids"]), prompt);
    assert_eq!(
        ids(&got["generated_ids"]),
        ids(&greedy["output_ids"])[prompt.len()..].to_vec(),
        "{setting}: greedy tokens differ from PEFT's"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn qlora_nf4_nested_matches_trl() {
    check_qlora("qlora_nf4_nested", QuantType::Nf4, true, false);
}

#[test]
fn qlora_fp4_matches_trl() {
    check_qlora("qlora_fp4", QuantType::Fp4, false, false);
}

/// Gradient checkpointing recomputes the 4-bit layers (dequantizing again): same results.
#[test]
fn qlora_with_gradient_checkpointing_matches_trl() {
    check_qlora("qlora_nf4_nested", QuantType::Nf4, true, true);
}

/// `glm4 merge --load_in_4bit` of a QLoRA adapter writes a plain checkpoint: the 4-bit
/// weights dequantized (carrying the quantization error, with a note saying so) and the
/// adapters folded into them.
#[test]
fn merge_of_a_qlora_run_writes_dequantized_weights() {
    let out = std::env::temp_dir().join(format!("glm4-qlora-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let adapter = root().join("tests/fixtures/trainer/qlora_nf4_nested/adapter_final");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "merge",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--adapter_path",
        ])
        .arg(&adapter)
        .arg("--output_dir")
        .arg(&out)
        .args([
            "--load_in_4bit",
            "--use_bnb_nested_quant",
            "--torch_dtype",
            "float32",
        ])
        .current_dir(root())
        .output()
        .expect("glm4 runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("carries the quantization error"),
        "{stderr}"
    );
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"), "{config}");

    let merged = GlmForCausalLM::from_pretrained(&out, Some(Kind::Float), Device::Cpu).unwrap();
    assert!(merged.quantization.is_none());
    let cfg = Quant4bitConfig {
        quant_type: QuantType::Nf4,
        nested: true,
    };
    let base = GlmForCausalLM::from_pretrained_quantized(
        root().join("weights/tiny-glm"),
        Some(Kind::Float),
        Device::Cpu,
        Some(cfg),
    )
    .unwrap();
    let plain = GlmForCausalLM::from_pretrained(
        root().join("weights/tiny-glm"),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap();
    let (m, b, p) = (
        merged.linear_layers(),
        base.linear_layers(),
        plain.linear_layers(),
    );
    // Not adapted: exactly the dequantized 4-bit weight, not the original.
    let o = "model.layers.0.self_attn.o_proj";
    let dequant = b[o].dense_weight(Kind::Float);
    assert!(m[o].dense_weight(Kind::Float).equal(&dequant));
    assert!(!dequant.equal(&p[o].dense_weight(Kind::Float)));
    // Adapted: dequantized weight + scaling · B A, in fp32.
    let ad = read_adapter(&adapter);
    let q = "model.layers.1.self_attn.q_proj";
    let a = &ad[&format!("base_model.model.{q}.lora_A.weight")];
    let bm = &ad[&format!("base_model.model.{q}.lora_B.weight")];
    let delta = bm.to_kind(Kind::Float).matmul(&a.to_kind(Kind::Float)) * 4.0;
    let want = b[q].dense_weight(Kind::Float) + delta;
    let diff = (m[q].dense_weight(Kind::Float) - want)
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-7, "merged q_proj differs by {diff}");
    let _ = std::fs::remove_dir_all(&out);
}

fn read_adapter(dir: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}
