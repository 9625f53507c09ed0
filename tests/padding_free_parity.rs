//! Padding-free rows in the model: several sequences back to back in one row,
//! each attending only to itself, give the logits of separate forward passes.

use glm4::glm::GlmForCausalLM;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};
use trl_like::modeling::{CausalLM, CausalLMInput, Checkpointable};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// The model: per-sequence causal attention in one padding-free row
// ---------------------------------------------------------------------------

fn load_model(arch: &str) -> GlmForCausalLM {
    GlmForCausalLM::from_pretrained(
        root().join("weights").join(format!("tiny-{arch}")),
        Some(Kind::Float),
        Device::Cpu,
    )
    .unwrap()
}

/// Logits of each sequence alone, and of all of them back to back in one
/// padding-free row (positions restarting at 0); also through the layer-by-layer
/// path the trainer's activation recompute uses.
fn check_concatenated(arch: &str, lens: &[i64]) {
    let model = load_model(arch);
    tch::manual_seed(7);
    let seqs: Vec<Tensor> = lens
        .iter()
        .map(|&n| Tensor::randint(1900, [1, n], (Kind::Int64, Device::Cpu)))
        .collect();
    let alone: Vec<Tensor> = seqs
        .iter()
        .map(|ids| {
            let input = CausalLMInput {
                input_ids: ids,
                attention_mask: None,
                position_ids: None,
                seq_lens: None,
            };
            tch::no_grad(|| model.forward(&input, None, false))
        })
        .collect();
    let row = Tensor::cat(&seqs, 1);
    let positions = Tensor::cat(
        &lens
            .iter()
            .map(|&n| Tensor::arange(n, (Kind::Int64, Device::Cpu)))
            .collect::<Vec<_>>(),
        0,
    )
    .unsqueeze(0);
    let input = CausalLMInput {
        input_ids: &row,
        attention_mask: None,
        position_ids: Some(&positions),
        seq_lens: Some(lens),
    };
    let packed = tch::no_grad(|| model.forward(&input, None, false));
    let layered = tch::no_grad(|| {
        let ctx = model.layer_context(&input);
        let mut h = model.embed(&row);
        for i in 0..Checkpointable::num_layers(&model) {
            h = model.layer_forward(i, &h, &ctx, false);
        }
        model.lm_head(&model.final_norm(&h))
    });
    let expected = Tensor::cat(&alone, 1);
    for (name, got) in [("forward", &packed), ("layer by layer", &layered)] {
        let diff = (got - &expected).abs().max().double_value(&[]);
        assert!(
            diff < 1e-5,
            "{arch} {lens:?} {name}: padding-free logits differ from separate runs by {diff}"
        );
    }
    // Without the segments the later sequences would see the earlier ones.
    let crossing = CausalLMInput {
        seq_lens: None,
        ..input
    };
    let mixed = tch::no_grad(|| model.forward(&crossing, None, false));
    let diff = (&mixed - &expected).abs().max().double_value(&[]);
    assert!(
        diff > 1e-3,
        "{arch}: the test cannot tell segments apart ({diff})"
    );
}

#[test]
fn padding_free_forward_equals_separate_sequences() {
    for arch in ["glm", "glm4"] {
        check_concatenated(arch, &[7, 12, 5]);
        // Equal lengths share one attention call.
        check_concatenated(arch, &[6, 9, 6, 9]);
    }
}
