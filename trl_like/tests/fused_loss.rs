//! The fused LM-head cross-entropy (`trl_like::ops`, a C++ autograd node)
//! against the plain tch path it replaces (`chunked_lm_loss_plain`): the same
//! loss, entropy and accuracy, and the same gradients for the hidden states
//! and (when it is trained) the head weight. Also the CUDA allocator
//! statistics answering "not available" on a machine without a GPU.

use tch::{Device, Kind, Tensor};
use trl_like::modeling::{CausalLM, CausalLMInput, KvCache};
use trl_like::trainer::loss::{chunked_lm_loss_plain, fused_lm_loss, LmLoss};

/// A bare `lm_head` (no bias): all the plain path needs of a model.
struct Head {
    weight: Tensor,
}

impl CausalLM for Head {
    fn forward_hidden(&self, _: &CausalLMInput, _: Option<&mut KvCache>, _: bool) -> Tensor {
        unreachable!("the loss tests only call lm_head")
    }
    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(&self.weight, None)
    }
    fn lm_head_weight(&self) -> Option<Tensor> {
        Some(self.weight.shallow_clone())
    }
    fn new_cache(&self) -> KvCache {
        KvCache::new(0)
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn dtype(&self) -> Kind {
        Kind::Float
    }
}

const VOCAB: i64 = 53;
const HIDDEN: i64 = 24;

/// Hidden states, head weight and labels with ignored (-100) positions:
/// a padded tail on row 0 and scattered prompt tokens.
fn inputs(batch: i64, seq: i64, seed: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let opts = (Kind::Float, Device::Cpu);
    let hidden = Tensor::randn([batch, seq, HIDDEN], opts);
    let weight = Tensor::randn([VOCAB, HIDDEN], opts) * 0.3;
    let mut labels = Tensor::randint(VOCAB, [batch, seq], (Kind::Int64, Device::Cpu));
    let ignored = Tensor::rand([batch, seq], opts).lt(0.2);
    labels = labels.masked_fill(&ignored, -100);
    if seq > 3 {
        let _ = labels.get(0).narrow(0, seq - 3, 3).fill_(-100);
    }
    (hidden, weight, labels)
}

/// Runs one loss implementation with backward; returns its numbers and the
/// gradients of the input `x` (hidden = 1.5·x, so the gradient has to flow
/// through the hidden states' graph) and of the weight (when trained).
fn run(
    fused: bool,
    x: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk: i64,
    train_weight: bool,
) -> (LmLoss, Tensor, Option<Tensor>) {
    let x = x.detach().set_requires_grad(true);
    let weight = weight.detach().set_requires_grad(train_weight);
    let hidden = &x * 1.5;
    let denom = labels.ne(-100).sum(Kind::Int64).int64_value(&[]).max(1) as f64;
    let out = if fused {
        fused_lm_loss(&hidden, &weight, labels, denom, true, chunk).expect("fused loss runs")
    } else {
        let head = Head {
            weight: weight.shallow_clone(),
        };
        chunked_lm_loss_plain(&head, &hidden, labels, denom, true, chunk)
    };
    let wgrad = train_weight.then(|| weight.grad());
    (out, x.grad(), wgrad)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn assert_same(fused: &LmLoss, plain: &LmLoss) {
    for (name, f, p) in [
        ("loss", fused.loss, plain.loss),
        ("entropy", fused.entropy, plain.entropy),
        ("accuracy", fused.accuracy, plain.accuracy),
    ] {
        assert!(
            (f - p).abs() <= 1e-6,
            "{name}: fused {f} vs plain {p} (difference {})",
            (f - p).abs()
        );
    }
}

#[test]
fn fused_loss_matches_plain_path_for_hidden_gradients() {
    // Chunks of one position, uneven chunks, and one chunk for everything.
    for (batch, seq, chunk) in [(3, 37, 3), (2, 40, 22), (1, 9, 256), (4, 5, 1)] {
        let (x, w, labels) = inputs(batch, seq, 7 + seq);
        let (plain, gp, _) = run(false, &x, &w, &labels, chunk, false);
        let (fused, gf, _) = run(true, &x, &w, &labels, chunk, false);
        assert_same(&fused, &plain);
        assert!(plain.loss > 0.0 && plain.entropy > 0.0);
        let d = max_diff(&gf, &gp);
        eprintln!(
            "batch {batch} seq {seq} chunk {chunk}: loss diff {:e}, entropy diff {:e}, hidden grad diff {d:e}",
            (fused.loss - plain.loss).abs(),
            (fused.entropy - plain.entropy).abs()
        );
        assert!(
            d <= 1e-5,
            "batch {batch} seq {seq} chunk {chunk}: hidden gradients differ by {d}"
        );
        // The last position predicts nothing and ignored labels give nothing back.
        assert_eq!(
            gf.select(1, seq - 1)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert!(gf.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

#[test]
fn fused_loss_trains_the_head_weight_when_it_requires_grad() {
    let (x, w, labels) = inputs(2, 30, 11);
    let (plain, gp, wp) = run(false, &x, &w, &labels, 16, true);
    let (fused, gf, wf) = run(true, &x, &w, &labels, 16, true);
    assert_same(&fused, &plain);
    assert!(max_diff(&gf, &gp) <= 1e-5);
    let (wp, wf) = (
        wp.expect("plain weight grad"),
        wf.expect("fused weight grad"),
    );
    assert!(wf.defined() && wf.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let d = max_diff(&wf, &wp);
    eprintln!("weight grad diff {d:e}");
    assert!(d <= 1e-5, "weight gradients differ by {d}");
}

#[test]
fn upstream_gradient_scales_the_fused_gradients() {
    // The loss enters a larger graph (here ×3): the node's backward has to
    // scale the gradients it formed in the forward by the incoming one.
    let (x, w, labels) = inputs(2, 19, 13);
    let (_, plain_grad, _) = run(false, &x, &w, &labels, 8, false);
    let leaf = x.detach().set_requires_grad(true);
    let hidden = &leaf * 1.5;
    let out = trl_like::ops::fused_lm_loss(&hidden, &w, &labels, 1.0, 8, -100).expect("op runs");
    let denom = labels.ne(-100).sum(Kind::Float).double_value(&[]);
    (out.loss * (3.0 / denom)).backward();
    let d = max_diff(&leaf.grad(), &(plain_grad * 3.0));
    assert!(d <= 1e-5, "scaled gradients differ by {d}");
}

#[test]
fn frozen_head_weight_gets_no_gradient() {
    let (x, w, labels) = inputs(2, 12, 3);
    let (_, _, wgrad) = run(true, &x, &w, &labels, 8, false);
    assert!(wgrad.is_none());
    // The frozen weight itself never receives a .grad.
    let weight = w.detach();
    let hidden = x.detach().set_requires_grad(true);
    fused_lm_loss(&hidden, &weight, &labels, 10.0, true, 8).expect("fused loss runs");
    assert!(!weight.grad().defined());
    assert!(hidden.grad().defined());
}

#[test]
fn fused_loss_without_backward_records_no_graph_and_matches() {
    let (x, w, labels) = inputs(3, 21, 5);
    let head = Head {
        weight: w.shallow_clone(),
    };
    let hidden = x.set_requires_grad(true);
    let plain = chunked_lm_loss_plain(&head, &hidden, &labels, 17.0, false, 10);
    let fused = fused_lm_loss(&hidden, &w, &labels, 17.0, false, 10).expect("fused loss runs");
    assert_same(&fused, &plain);
    assert!(!hidden.grad().defined());
    // The raw op under no_grad hands back a loss without a graph.
    let out = tch::no_grad(|| trl_like::ops::fused_lm_loss(&hidden, &w, &labels, 17.0, 10, -100))
        .expect("op runs");
    assert!(!out.loss.requires_grad());
    // 10 tokens over 3 rows = 3 positions per chunk; 20 positions = 7 chunks.
    assert_eq!(out.stats.size(), vec![7, 4]);
}

#[test]
fn single_token_rows_have_no_loss_and_backpropagate_nothing() {
    let (x, w, labels) = inputs(2, 1, 1);
    let hidden = x.set_requires_grad(true);
    let out = fused_lm_loss(&hidden, &w, &labels, 1.0, true, 4).expect("fused loss runs");
    assert_eq!((out.loss, out.entropy, out.accuracy), (0.0, 0.0, 0.0));
    assert!(!hidden.grad().defined());
}

#[test]
fn fused_loss_rejects_bad_inputs_with_a_message() {
    let (x, w, labels) = inputs(2, 6, 2);
    let err = fused_lm_loss(&x, &w, &labels.to_kind(Kind::Int), 1.0, false, 4)
        .expect_err("int32 labels are refused");
    let msg = err.to_string();
    assert!(msg.contains("labels must be int64"), "{msg}");
    let err = fused_lm_loss(&x, &w.narrow(1, 0, 5), &labels, 1.0, false, 4)
        .expect_err("a weight of the wrong width is refused");
    assert!(err.to_string().contains("lm_head weight must be"), "{err}");
}

#[test]
fn cuda_operations_say_not_available_without_a_gpu() {
    if tch::Cuda::is_available() {
        // Exercised by the GPU script instead; here just the call's shape.
        let stats = trl_like::ops::cuda_memory_stats().expect("stats on a GPU machine");
        assert!(stats.is_some_and(|s| s.peak_allocated >= s.allocated));
        return;
    }
    assert_eq!(trl_like::ops::cuda_memory_stats().expect("no error"), None);
    assert!(!trl_like::ops::cuda_reset_peak_memory_stats().expect("no error"));
    assert!(!trl_like::ops::varlen_attention_supported(
        Device::Cpu,
        Kind::BFloat16,
        128
    ));
    // Called anyway on CPU tensors, the varlen attention refuses by name.
    let q = Tensor::zeros([1, 4, 6, 8], (Kind::BFloat16, Device::Cpu));
    let k = Tensor::zeros([1, 2, 6, 8], (Kind::BFloat16, Device::Cpu));
    let err = trl_like::ops::varlen_causal_attention(&q, &k, &k, &[2, 4], 0.35)
        .expect_err("no varlen attention on CPU");
    assert!(err.to_string().contains("needs CUDA"), "{err}");
}
