//! Parity with Hugging Face transformers on the embedded tiny models.
//!
//! Fixtures come from `scripts/make_fixtures.py` (transformers 5.23, torch 2.11,
//! fp32): logits of a left-padded batch and greedy generations, for both the
//! `glm` (GLM-4-9B) and `glm4` (GLM-4-0414) architectures.

use glm4::glm::GlmForCausalLM;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use trl_like::generation::{generate, GenerationConfig};
use trl_like::modeling::{CausalLM, CausalLMInput};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load_model(arch: &str) -> GlmForCausalLM {
    GlmForCausalLM::from_pretrained(
        root().join("weights").join(format!("tiny-{arch}")),
        Some(Kind::Float),
        Device::Cpu,
    )
    .expect("tiny model loads")
}

fn fixture_tensors(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(root().join("tests/fixtures").join(name))
        .expect("fixture readable")
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_logits(arch: &str) {
    let model = load_model(arch);
    let fx = fixture_tensors(&format!("{arch}_logits.safetensors"));
    let (ids, mask, expected) = (&fx["input_ids"], &fx["attention_mask"], &fx["logits"]);
    let input = CausalLMInput {
        input_ids: ids,
        attention_mask: Some(mask),
        position_ids: None,
        seq_lens: None,
    };
    let logits = tch::no_grad(|| model.forward(&input, None, false));
    assert_eq!(logits.size(), expected.size());
    // Compare real tokens only: transformers' logits at padding positions are meaningless.
    let real = mask.ne(0).unsqueeze(-1).expand_as(&logits);
    let diff = (logits.masked_select(&real) - expected.masked_select(&real))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-4,
        "{arch}: padded-batch logits differ from transformers by {diff}"
    );

    // The unpadded row alone takes the causal fast path (no dense mask).
    let row0 = ids.narrow(0, 0, 1);
    let input = CausalLMInput {
        input_ids: &row0,
        attention_mask: None,
        position_ids: None,
        seq_lens: None,
    };
    let logits = tch::no_grad(|| model.forward(&input, None, false));
    let diff = max_abs_diff(&logits, &fx["logits_nopad"]);
    assert!(
        diff < 1e-4,
        "{arch}: unpadded logits differ from transformers by {diff}"
    );
}

#[test]
fn glm_logits_match_transformers() {
    check_logits("glm");
}

#[test]
fn glm4_logits_match_transformers() {
    check_logits("glm4");
}

fn check_generation(arch: &str) {
    let model = load_model(arch);
    let dir = root().join("weights").join(format!("tiny-{arch}"));
    let base = GenerationConfig::from_pretrained(&dir)
        .unwrap()
        .expect("generation_config.json");
    let text = std::fs::read_to_string(root().join(format!("tests/fixtures/{arch}_generate.json")))
        .unwrap();
    let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
    let to_tensor = |v: &serde_json::Value| {
        let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).unwrap();
        let width = rows[0].len();
        Tensor::from_slice(&rows.concat()).view([rows.len() as i64, width as i64])
    };
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ids = to_tensor(&case["input_ids"]);
        let mask = to_tensor(&case["attention_mask"]);
        let mut cfg = base.clone();
        cfg.do_sample = false;
        cfg.max_new_tokens = Some(case["max_new_tokens"].as_u64().unwrap() as usize);
        let out = generate(&model, &ids, Some(&mask), &cfg, None).unwrap();
        let got: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&out.sequences).unwrap();
        let expected: Vec<Vec<i64>> = serde_json::from_value(case["output_ids"].clone()).unwrap();
        assert_eq!(
            got, expected,
            "{arch}/{name}: greedy generation differs from transformers"
        );
    }
}

#[test]
fn glm_greedy_generation_matches_transformers() {
    check_generation("glm");
}

#[test]
fn glm4_greedy_generation_matches_transformers() {
    check_generation("glm4");
}

/// Decoding with the KV cache gives the same logits as recomputing the whole
/// sequence at every step.
#[test]
fn kv_cache_matches_full_recompute() {
    let model = load_model("glm");
    let ids = Tensor::from_slice(&[5i64, 17, 300, 42, 7, 99, 1000, 3]).view([1, 8]);
    let full = tch::no_grad(|| {
        model.forward(
            &CausalLMInput {
                input_ids: &ids,
                attention_mask: None,
                position_ids: None,
                seq_lens: None,
            },
            None,
            false,
        )
    });
    let mut cache = model.new_cache();
    let mut steps = Vec::new();
    tch::no_grad(|| {
        let prefix = ids.narrow(1, 0, 3);
        steps.push(model.forward(
            &CausalLMInput {
                input_ids: &prefix,
                attention_mask: None,
                position_ids: None,
                seq_lens: None,
            },
            Some(&mut cache),
            false,
        ));
        for t in 3..8 {
            let tok = ids.narrow(1, t, 1);
            steps.push(model.forward(
                &CausalLMInput {
                    input_ids: &tok,
                    attention_mask: None,
                    position_ids: None,
                    seq_lens: None,
                },
                Some(&mut cache),
                false,
            ));
        }
    });
    let incremental = Tensor::cat(&steps, 1);
    let diff = max_abs_diff(&full, &incremental);
    assert!(
        diff < 1e-4,
        "cached decoding differs from full recompute by {diff}"
    );
}

/// SDPA with grouped-query attention and a dense mask equals attention written out by hand.
#[test]
fn sdpa_matches_manual_attention() {
    use glm4::glm::attention::{build_mask, AttentionMask};
    tch::manual_seed(1);
    let (b, nh, nkv, t, d) = (2, 4, 2, 6, 8);
    let q = Tensor::randn([b, nh, t, d], (Kind::Float, Device::Cpu));
    let k = Tensor::randn([b, nkv, t, d], (Kind::Float, Device::Cpu));
    let v = Tensor::randn([b, nkv, t, d], (Kind::Float, Device::Cpu));
    let pad = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]).view([b, t]);
    let AttentionMask::Dense(mask) = build_mask(Some(&pad), 0, t, Device::Cpu) else {
        panic!("expected a dense mask")
    };
    let scale = (d as f64).powf(-0.5);
    let sdpa =
        Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask), 0.0, false, scale, true);
    let rep = nh / nkv;
    let k_full = k.repeat_interleave_self_int(rep, 1, None);
    let v_full = v.repeat_interleave_self_int(rep, 1, None);
    let scores = q.matmul(&k_full.transpose(-1, -2)) * scale;
    let scores = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
    let manual = scores.softmax(-1, Kind::Float).matmul(&v_full);
    // Row 1's first two queries are padding: compare real queries only.
    let real = pad.ne(0).view([b, 1, t, 1]).expand_as(&manual);
    let diff = (sdpa.masked_select(&real) - manual.masked_select(&real))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "SDPA differs from manual attention by {diff}");
}

fn generation_fixture() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/generation_processors.json")).unwrap(),
    )
    .unwrap()
}

/// Greedy decoding with a repetition penalty (above and below 1) gives transformers' tokens.
#[test]
fn repetition_penalty_matches_transformers() {
    let model = load_model("glm");
    let base = GenerationConfig::from_pretrained(root().join("weights/tiny-glm"))
        .unwrap()
        .unwrap();
    for case in generation_fixture()["greedy_with_penalty"]
        .as_array()
        .unwrap()
    {
        let prompt: Vec<i64> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let mut cfg = base.clone();
        cfg.repetition_penalty = case["repetition_penalty"].as_f64().unwrap();
        cfg.max_new_tokens = Some(case["max_new_tokens"].as_u64().unwrap() as usize);
        let out = generate(
            &model,
            &Tensor::from_slice(&prompt).unsqueeze(0),
            None,
            &cfg,
            None,
        )
        .unwrap();
        let got: Vec<i64> = Vec::try_from(out.sequences.get(0)).unwrap();
        let want: Vec<i64> = serde_json::from_value(case["output_ids"].clone()).unwrap();
        assert_eq!(got, want, "repetition_penalty {}", cfg.repetition_penalty);
    }
}

/// Temperature, top-k and top-p warp scores exactly as transformers' warpers.
#[test]
fn sampling_warpers_match_transformers() {
    use trl_like::generation::process_logits;
    let fx = generation_fixture();
    let rows: Vec<Vec<f32>> = serde_json::from_value(fx["scores"].clone()).unwrap();
    let scores = Tensor::from_slice(&rows.concat()).view([2, 50]);
    let dummy = Tensor::zeros([2, 1], (Kind::Int64, Device::Cpu));
    let settings = [
        ("temperature_0.6", 0.6, 0, 1.0),
        ("top_k_5", 1.0, 5, 1.0),
        ("top_p_0.8", 1.0, 0, 0.8),
        ("chat_chain", 0.6, 50, 0.8),
    ];
    for (name, temperature, top_k, top_p) in settings {
        let cfg = GenerationConfig {
            do_sample: true,
            temperature,
            top_k,
            top_p,
            ..GenerationConfig::default()
        };
        let got: Vec<Vec<f32>> = Vec::try_from(process_logits(&scores, &dummy, &cfg)).unwrap();
        let want: Vec<Vec<Option<f32>>> =
            serde_json::from_value(fx["warped"][name].clone()).unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            match w {
                None => assert_eq!(
                    *g,
                    f32::NEG_INFINITY,
                    "{name}: a filtered score must be -inf"
                ),
                Some(w) => assert!((g - w).abs() < 1e-6, "{name}: {g} vs {w}"),
            }
        }
    }
}

/// A prompt that is not `[batch, seq]` with at least one token, or a mask of
/// another shape, is an error naming the shapes (it used to panic in `expect`
/// or deep inside the forward pass).
#[test]
fn generate_rejects_bad_input_shapes() {
    use trl_like::generation::GenerationError;
    let model = load_model("glm");
    let cfg = GenerationConfig {
        max_new_tokens: Some(1),
        ..GenerationConfig::default()
    };
    for ids in [
        Tensor::from_slice(&[1i64, 2, 3]),
        Tensor::zeros([1, 0], (Kind::Int64, Device::Cpu)),
        Tensor::zeros([0, 3], (Kind::Int64, Device::Cpu)),
    ] {
        let err = generate(&model, &ids, None, &cfg, None).err().unwrap();
        assert!(matches!(err, GenerationError::InputShape(_)), "{err}");
    }
    let ids = Tensor::from_slice(&[1i64, 2, 3]).unsqueeze(0);
    let mask = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
    let err = generate(&model, &ids, Some(&mask), &cfg, None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("[1, 2]"), "{err}");
    assert!(generate(&model, &ids, None, &cfg, None).is_ok());
}
