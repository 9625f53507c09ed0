//! q/k/v as one GEMM on a frozen base (issue 13 item 2) against the three
//! separate projections, on the tiny GLM-4 (fp32, q/k/v biases): the same
//! logits and LoRA gradients (dropout on: the same masks, in the same order),
//! and the fused buffer invisible to everything that reads weights by name —
//! `named_parameters`, `save_pretrained`, `merge_and_unload`.

use glm4::glm::GlmForCausalLM;
use std::path::PathBuf;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};
use trl_like::modeling::{CausalLM, CausalLMInput, PreTrainedModel};
use trl_like::nn::LinearWeight;
use trl_like::peft::{merge_and_unload, LoraConfig, PeftAdapter, TargetModules};

/// The tests seed and draw from libtorch's one global generator (dropout).
static SERIAL: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> GlmForCausalLM {
    GlmForCausalLM::from_pretrained(
        root().join("weights/tiny-glm"),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap()
}

fn all_fused(model: &GlmForCausalLM) -> bool {
    model.model.layers.iter().all(|l| l.self_attn.qkv_fused())
}

/// Makes q/k/v trainable (so the fused path steps aside) or frozen again.
fn set_qkv_trainable(model: &GlmForCausalLM, on: bool) {
    for l in &model.model.layers {
        let a = &l.self_attn;
        for lin in [&a.q_proj, &a.k_proj, &a.v_proj] {
            if let LinearWeight::Dense(w) = &lin.weight {
                let _ = w.set_requires_grad(on);
            }
            if let Some(b) = &lin.bias {
                let _ = b.set_requires_grad(on);
            }
        }
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A padded batch of two rows.
fn input_ids() -> (Tensor, Tensor) {
    tch::manual_seed(5);
    let ids = Tensor::randint(1900, [2, 9], (Kind::Int64, Device::Cpu));
    let mask = Tensor::from_slice(&[1i64; 9])
        .view([1, 9])
        .repeat([2, 1])
        .index_fill(1, &Tensor::from_slice(&[7i64, 8]), 0)
        .index_fill(0, &Tensor::from_slice(&[0i64]), 1);
    (ids, mask)
}

#[test]
fn fused_qkv_equals_separate_projections_with_lora_dropout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut model = tiny();
    assert!(
        all_fused(&model),
        "a loaded (frozen) model runs q/k/v fused"
    );
    let cfg = LoraConfig::new(
        8,
        32.0,
        0.1,
        TargetModules::Names(vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]),
    );
    tch::manual_seed(1);
    let adapter = PeftAdapter::attach_new(&mut model, cfg, Device::Cpu).unwrap();
    let params = adapter.named_parameters();
    tch::no_grad(|| {
        for (name, p) in &params {
            if name.contains("lora_B") {
                let _ = p.shallow_clone().normal_(0.0, 0.05);
            }
        }
    });
    assert!(all_fused(&model), "attaching adapters keeps the fusion");
    let (ids, mask) = input_ids();
    let run = |model: &GlmForCausalLM| {
        let input = CausalLMInput {
            input_ids: &ids,
            attention_mask: Some(&mask),
            position_ids: None,
            seq_lens: None,
        };
        tch::manual_seed(9);
        let logits = model.forward(&input, None, true);
        (&logits * &logits).mean(Kind::Float).backward();
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().copy()).collect();
        for (_, p) in &params {
            let _ = p.grad().zero_();
        }
        let eval = tch::no_grad(|| model.forward(&input, None, false));
        (logits.detach(), grads, eval)
    };
    let fused = run(&model);
    set_qkv_trainable(&model, true);
    assert!(
        !all_fused(&model),
        "trainable q/k/v step out of the fused path"
    );
    let separate = run(&model);
    set_qkv_trainable(&model, false);
    assert!(all_fused(&model), "frozen again: fused again");

    let d = max_diff(&fused.0, &separate.0);
    assert!(d <= 1e-6, "training logits differ by {d}");
    let d = max_diff(&fused.2, &separate.2);
    assert!(d <= 1e-6, "evaluation logits differ by {d}");
    for ((name, _), (a, b)) in params.iter().zip(fused.1.iter().zip(&separate.1)) {
        let scale = b.abs().max().double_value(&[]);
        assert!(scale > 0.0, "{name}: no gradient");
        let d = max_diff(a, b);
        assert!(d <= 1e-6 * (1.0 + scale), "{name}: gradients differ by {d}");
    }
}

#[test]
fn the_fused_buffer_is_never_seen_by_name_saved_or_merged_apart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = root().join("weights/tiny-glm");
    let on_disk = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    let mut model = tiny();
    assert!(all_fused(&model));
    // The same names and values as the checkpoint: no extra tensor, nothing moved.
    let named = model.named_parameters();
    assert_eq!(named.len(), on_disk.len());
    for (name, t) in &on_disk {
        let ours = &named.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(ours.equal(t), "{name} changed by the fusion");
    }
    let out = std::env::temp_dir().join(format!("glm4-fused-save-{}", std::process::id()));
    model.save_pretrained(&out).unwrap();
    let saved = Tensor::read_safetensors(out.join("model.safetensors")).unwrap();
    assert_eq!(saved.len(), on_disk.len());
    for (name, t) in &saved {
        let orig = &on_disk.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(orig.equal(t), "{name} saved differently");
    }
    let _ = std::fs::remove_dir_all(&out);

    // Merging writes into the weights in place: the fused path stays exact.
    let cfg = LoraConfig::new(4, 8.0, 0.0, TargetModules::AllLinear);
    tch::manual_seed(2);
    let adapter = PeftAdapter::attach_new(&mut model, cfg, Device::Cpu).unwrap();
    tch::no_grad(|| {
        for (name, p) in adapter.named_parameters() {
            if name.contains("lora_B") {
                let _ = p.shallow_clone().normal_(0.0, 0.05);
            }
        }
    });
    let (ids, mask) = input_ids();
    let input = CausalLMInput {
        input_ids: &ids,
        attention_mask: Some(&mask),
        position_ids: None,
        seq_lens: None,
    };
    let with_adapters = tch::no_grad(|| model.forward(&input, None, false));
    merge_and_unload(&mut model);
    assert!(
        all_fused(&model),
        "merging keeps the weights the fused views"
    );
    let merged_fused = tch::no_grad(|| model.forward(&input, None, false));
    set_qkv_trainable(&model, true);
    let merged_separate = tch::no_grad(|| model.forward(&input, None, false));
    let d = max_diff(&merged_fused, &merged_separate);
    assert!(d <= 1e-6, "merged: fused and separate differ by {d}");
    let d = max_diff(&merged_fused, &with_adapters);
    assert!(d <= 1e-4, "merging changed the outputs by {d}");
}
