//! Loading 4-bit GLM models: quantizing a plain checkpoint while it loads
//! (`--load_in_4bit`), and a checkpoint transformers saved already quantized.
//!
//! Fixtures: `scripts/make_quant_fixtures.py` → tests/fixtures/quant/tiny-glm-*: what
//! transformers 5.23 + bitsandbytes 0.50.2 save for weights/tiny-glm loaded with
//! `BitsAndBytesConfig(load_in_4bit=True, ...)` (the 4-bit tensors; the rest equals
//! weights/tiny-glm) and the logits of a left-padded batch.

use glm4::glm::GlmForCausalLM;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use trl_like::modeling::{CausalLM, CausalLMInput};
use trl_like::nn::LinearWeight;
use trl_like::quant::{Quant4bitConfig, QuantType};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .expect("readable safetensors")
        .into_iter()
        .collect()
}

const VARIANTS: [(&str, QuantType, bool); 2] = [
    ("tiny-glm-nf4-nested", QuantType::Nf4, true),
    ("tiny-glm-fp4", QuantType::Fp4, false),
];

/// Rebuilds the checkpoint transformers saved: weights/tiny-glm's unquantized tensors, the
/// fixture's 4-bit ones, `quantization_config` in config.json. `edit` may corrupt it.
fn prequantized_checkpoint(
    variant: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let fx = read(&root().join(format!("tests/fixtures/quant/{variant}.safetensors")));
    let mut tensors = read(&root().join("weights/tiny-glm/model.safetensors"));
    for (k, v) in fx.iter().filter(|(k, _)| !k.starts_with("inputs.")) {
        tensors.insert(k.clone(), v.shallow_clone());
    }
    edit(&mut tensors);
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("glm4-qlora-{variant}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("weights/tiny-glm/config.json")).unwrap(),
    )
    .unwrap();
    config["quantization_config"] = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!(
            "tests/fixtures/quant/{variant}.quantization_config.json"
        )))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&named, dir.join("model.safetensors")).unwrap();
    dir
}

/// Max |logits - transformers'| over real (unpadded) tokens.
fn logits_error(model: &GlmForCausalLM, variant: &str) -> f64 {
    let fx = read(&root().join(format!("tests/fixtures/quant/{variant}.safetensors")));
    let (ids, mask, expected) = (
        &fx["inputs.input_ids"],
        &fx["inputs.attention_mask"],
        &fx["inputs.logits"],
    );
    let input = CausalLMInput {
        input_ids: ids,
        attention_mask: Some(mask),
        position_ids: None,
        seq_lens: None,
    };
    let logits = tch::no_grad(|| model.forward(&input, None, false));
    let real = mask.ne(0).unsqueeze(-1).expand_as(&logits);
    (logits.masked_select(&real) - expected.masked_select(&real))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn prequantized_checkpoint_gives_transformers_logits() {
    for (variant, quant_type, nested) in VARIANTS {
        let dir = prequantized_checkpoint(variant, |_| {});
        let model = GlmForCausalLM::from_pretrained(&dir, Some(Kind::Float), Device::Cpu).unwrap();
        assert_eq!(
            model.quantization,
            Some(Quant4bitConfig { quant_type, nested })
        );
        let err = logits_error(&model, variant);
        eprintln!("{variant}: max |logits - transformers| = {err:.1e}");
        assert!(
            err < 1e-4,
            "{variant}: logits differ from transformers by {err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn quantizing_while_loading_matches_transformers_codes_and_logits() {
    for (variant, quant_type, nested) in VARIANTS {
        let cfg = Quant4bitConfig { quant_type, nested };
        let model = GlmForCausalLM::from_pretrained_quantized(
            root().join("weights/tiny-glm"),
            Some(Kind::Float),
            Device::Cpu,
            Some(cfg),
        )
        .unwrap();
        let layers = model.linear_layers();
        assert!(
            matches!(layers["lm_head"].weight, LinearWeight::Dense(_)),
            "lm_head stays dense"
        );
        assert!(matches!(
            layers["model.layers.0.mlp.down_proj"].weight,
            LinearWeight::Quant4bit(_)
        ));
        // The codes and state transformers saved, bit for bit.
        let fx = read(&root().join(format!("tests/fixtures/quant/{variant}.safetensors")));
        let vars = model.vs.variables();
        let mut compared = 0;
        for (key, expected) in fx
            .iter()
            .filter(|(k, _)| !k.starts_with("inputs.") && !k.contains(".quant_state."))
        {
            let ours = &vars[key];
            assert_eq!(ours.size(), expected.size(), "{key}");
            assert!(
                ours.equal(expected),
                "{variant}: {key} differs from transformers'"
            );
            compared += 1;
        }
        assert_eq!(
            compared,
            12 * if nested { 5 } else { 3 },
            "{variant}: 4-bit tensors"
        );
        let err = logits_error(&model, variant);
        eprintln!("{variant}: max |logits - transformers| = {err:.1e}");
        assert!(
            err < 1e-4,
            "{variant}: logits differ from transformers by {err}"
        );
    }
}

#[test]
fn corrupt_prequantized_checkpoint_names_the_tensor() {
    let key = "model.layers.1.self_attn.o_proj.weight";
    let dir = prequantized_checkpoint("tiny-glm-nf4-nested", |t| {
        t.remove(&format!("{key}.absmax"));
    });
    let err = GlmForCausalLM::from_pretrained(&dir, Some(Kind::Float), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("{key}.absmax")), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    let dir = prequantized_checkpoint("tiny-glm-nf4-nested", |t| {
        let short = t[key].narrow(0, 0, 100);
        t.insert(key.to_string(), short);
    });
    let err = GlmForCausalLM::from_pretrained(&dir, Some(Kind::Float), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(key) && err.contains("[100, 1]"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `glm4 generate --load_in_4bit` quantizes while loading and decodes transformers'
/// greedy tokens for the same 4-bit model.
#[test]
fn generate_with_load_in_4bit_matches_transformers() {
    let text = std::fs::read_to_string(
        root().join("tests/fixtures/quant/tiny-glm-nf4-nested.generate.json"),
    )
    .unwrap();
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_glm4"))
        .args([
            "generate",
            "--model_name_or_path",
            "weights/tiny-glm",
            "--load_in_4bit",
            "--use_bnb_nested_quant",
            "--bnb_4bit_quant_type",
            "nf4",
            "--prompt",
            fx["prompt"].as_str().unwrap(),
            "--max_new_tokens",
            "12",
            "--json",
        ])
        .current_dir(root())
        .output()
        .expect("glm4 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let ids = |v: &serde_json::Value| -> Vec<i64> { serde_json::from_value(v.clone()).unwrap() };
    let prompt = ids(&fx["input_ids"]);
    assert_eq!(ids(&got["prompt_ids"]), prompt);
    assert_eq!(
        ids(&got["generated_ids"]),
        ids(&fx["output_ids"])[prompt.len()..].to_vec()
    );
}
