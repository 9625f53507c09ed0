//! Adapters saved by Python PEFT load here with the same outputs, and
//! `merge_and_unload` gives what PEFT's merged model gives.
//! Fixtures: `scripts/make_trainer_fixtures.py` (PEFT 0.21, r 4 on
//! q/v/gate_up/down with non-zero A and B).

use glm4::glm::GlmForCausalLM;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use trl_like::generation::{generate, GenerationConfig};
use trl_like::modeling::{CausalLM, CausalLMInput};
use trl_like::peft::{merge_and_unload, PeftAdapter};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_with_adapter() -> GlmForCausalLM {
    let mut model = GlmForCausalLM::from_pretrained(
        root().join("weights/tiny-glm"),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap();
    let adapter = PeftAdapter::load(
        &mut model,
        &root().join("tests/fixtures/trainer/peft_adapter"),
        Device::Cpu,
        false,
    )
    .unwrap();
    assert_eq!(adapter.modules.len(), 8, "q/v/gate_up/down in both layers");
    model
}

fn expected() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(
        root().join("tests/fixtures/trainer/peft_adapter_expected.safetensors"),
    )
    .unwrap()
    .into_iter()
    .collect()
}

fn masked_diff(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    let real = mask.ne(0).unsqueeze(-1).expand_as(a);
    (a.masked_select(&real) - b.masked_select(&real))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn peft_saved_adapter_gives_peft_logits() {
    let model = model_with_adapter();
    let fx = expected();
    let input = CausalLMInput {
        input_ids: &fx["input_ids"],
        attention_mask: Some(&fx["attention_mask"]),
        position_ids: None,
        seq_lens: None,
    };
    let logits = tch::no_grad(|| model.forward(&input, None, false));
    let diff = masked_diff(&logits, &fx["logits"], &fx["attention_mask"]);
    assert!(diff < 1e-4, "logits with the PEFT adapter differ by {diff}");
}

#[test]
fn peft_saved_adapter_greedy_generation_matches() {
    let model = model_with_adapter();
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/trainer/greedy.json")).unwrap(),
    )
    .unwrap();
    let prompt: Vec<i64> = serde_json::from_value(fx["prompt_ids"].clone()).unwrap();
    let mut cfg = GenerationConfig::from_pretrained(root().join("weights/tiny-glm"))
        .unwrap()
        .unwrap();
    cfg.max_new_tokens = Some(fx["max_new_tokens"].as_u64().unwrap() as usize);
    let out = generate(
        &model,
        &Tensor::from_slice(&prompt).unsqueeze(0),
        None,
        &cfg,
        None,
    )
    .unwrap();
    let got: Vec<i64> = Vec::try_from(out.sequences.get(0)).unwrap();
    let want: Vec<i64> = serde_json::from_value(fx["output_ids"].clone()).unwrap();
    assert_eq!(got, want);
}

#[test]
fn merge_and_unload_matches_peft() {
    let mut model = model_with_adapter();
    merge_and_unload(&mut model);
    let fx = expected();
    let input = CausalLMInput {
        input_ids: &fx["input_ids"],
        attention_mask: Some(&fx["attention_mask"]),
        position_ids: None,
        seq_lens: None,
    };
    let logits = tch::no_grad(|| model.forward(&input, None, false));
    let diff = masked_diff(&logits, &fx["merged_logits"], &fx["attention_mask"]);
    assert!(
        diff < 1e-4,
        "merged logits differ from PEFT's merge_and_unload by {diff}"
    );
}

/// An adapter that names a module the model lacks is refused with the list of modules it has.
#[test]
fn adapter_for_unknown_module_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("glm4-bad-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = root().join("tests/fixtures/trainer/peft_adapter");
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let t = Tensor::zeros([4, 128], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(
        &[
            (
                "base_model.model.model.layers.0.self_attn.qkv.lora_A.weight",
                &t,
            ),
            (
                "base_model.model.model.layers.0.self_attn.qkv.lora_B.weight",
                &t,
            ),
        ],
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut model = GlmForCausalLM::from_pretrained(
        root().join("weights/tiny-glm"),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap();
    let err = PeftAdapter::load(&mut model, &dir, Device::Cpu, false)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("self_attn.qkv") && err.contains("q_proj"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
