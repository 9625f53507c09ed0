//! Checks the C++ operations of `trl_like::ops` on the device at hand and
//! prints one JSON object (scripts/gpu_bench.sh runs it on a lent GPU):
//!
//! - variable-length causal attention (one flash kernel over a padding-free
//!   row) against one SDPA call per sequence, bf16, GLM-4-9B's heads (32
//!   query heads sharing 2 key/value heads, head_dim 128): output and q/k/v
//!   gradients, and the time of forward + backward;
//! - the fused LM-head cross-entropy against the plain chunked path, at
//!   GLM-4-9B's hidden size and vocabulary, batch 2 × 512, in the model dtype:
//!   loss, hidden-state gradients, time and peak allocated memory of each;
//! - the CUDA allocator statistics answering at all.
//!
//! Without CUDA the attention check is skipped and the loss check runs small
//! in fp32 (a dry run). Exits non-zero when a check fails.
//!
//! `cargo run --release -p trl_like --example ops_check`

use serde_json::{json, Value};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use trl_like::modeling::{CausalLM, CausalLMInput, KvCache};
use trl_like::ops;
use trl_like::trainer::loss::{chunked_lm_loss_plain, fused_lm_loss, LOSS_CHUNK_TOKENS};

/// A bare `lm_head`, what the plain loss path needs of a model.
struct Head {
    weight: Tensor,
}

impl CausalLM for Head {
    fn forward_hidden(&self, _: &CausalLMInput, _: Option<&mut KvCache>, _: bool) -> Tensor {
        unreachable!("only lm_head is used")
    }
    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(&self.weight, None)
    }
    fn new_cache(&self) -> KvCache {
        KvCache::new(0)
    }
    fn device(&self) -> Device {
        self.weight.device()
    }
    fn dtype(&self) -> Kind {
        self.weight.kind()
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Float);
    let b = b.to_kind(Kind::Float);
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12)
}

/// Per-sequence SDPA over a padding-free row: the reference.
fn per_sequence(q: &Tensor, k: &Tensor, v: &Tensor, lens: &[i64], scale: f64) -> Tensor {
    let mut start = 0;
    let mut outs = Vec::new();
    for &l in lens {
        let s = |t: &Tensor| t.narrow(2, start, l);
        outs.push(Tensor::scaled_dot_product_attention::<Tensor>(
            &s(q),
            &s(k),
            &s(v),
            None,
            0.0,
            true,
            scale,
            true,
        ));
        start += l;
    }
    Tensor::cat(&outs, 2)
}

fn attention_check(device: Device) -> Value {
    let kind = Kind::BFloat16;
    let (heads, kv_heads, d) = (32, 2, 128);
    if !ops::varlen_attention_supported(device, kind, d) {
        return json!({"skipped": format!("needs CUDA and a build with the CUDA ops (device {device:?}, built {})", ops::has_cuda_ops())});
    }
    // Lengths like a padding-free Alpaca batch: uneven, some repeated.
    let lens: Vec<i64> = vec![87, 412, 33, 256, 256, 129, 5, 870];
    let total: i64 = lens.iter().sum();
    tch::manual_seed(0);
    let leaf = |h: i64| Tensor::randn([1, h, total, d], (kind, device)).set_requires_grad(true);
    let (q, k, v) = (leaf(heads), leaf(kv_heads), leaf(kv_heads));
    let grad_out = Tensor::randn([1, heads, total, d], (kind, device));
    let scale = (d as f64).powf(-0.5);
    let run = |varlen: bool| -> Result<(Tensor, Tensor, Tensor, Tensor), ops::OpsError> {
        for t in [&q, &k, &v] {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let out = if varlen {
            ops::varlen_causal_attention(&q, &k, &v, &lens, scale)?
        } else {
            per_sequence(&q, &k, &v, &lens, scale)
        };
        (&out * &grad_out).sum(Kind::Float).backward();
        Ok((
            out.detach(),
            q.grad().copy(),
            k.grad().copy(),
            v.grad().copy(),
        ))
    };
    let time = |varlen: bool| -> Result<f64, ops::OpsError> {
        let _ = run(varlen)?;
        sync(device);
        let t0 = Instant::now();
        for _ in 0..10 {
            let _ = run(varlen)?;
        }
        sync(device);
        Ok(t0.elapsed().as_secs_f64() / 10.0)
    };
    let (reference, fast) = match (run(false), run(true)) {
        (Ok(r), Ok(f)) => (r, f),
        (_, Err(e)) | (Err(e), _) => return json!({"ok": false, "error": e.to_string()}),
    };
    let diffs = [
        rel_diff(&fast.0, &reference.0),
        rel_diff(&fast.1, &reference.1),
        rel_diff(&fast.2, &reference.2),
        rel_diff(&fast.3, &reference.3),
    ];
    // bf16 kernels with fp32 accumulation differ in rounding only.
    let ok = diffs.iter().all(|d| *d <= 2e-2);
    json!({
        "ok": ok,
        "dtype": "bfloat16",
        "seq_lens": lens,
        "heads": heads, "kv_heads": kv_heads, "head_dim": d,
        "rel_diff": {"out": diffs[0], "grad_q": diffs[1], "grad_k": diffs[2], "grad_v": diffs[3]},
        "seconds_fwd_bwd": {"per_sequence_sdpa": time(false).ok(), "varlen_flash": time(true).ok()},
    })
}

fn loss_check(device: Device) -> Value {
    let cuda = matches!(device, Device::Cuda(_));
    // OPS_CHECK_LOSS_SHAPE=batch,seq,hidden,vocab overrides the shape (CPU timings).
    let custom: Option<Vec<i64>> = std::env::var("OPS_CHECK_LOSS_SHAPE")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<i64>| v.len() == 4);
    let kind = if cuda { Kind::BFloat16 } else { Kind::Float };
    let (batch, seq, hidden, vocab) = match custom.as_deref() {
        Some(&[b, s, h, v]) => (b, s, h, v),
        _ if cuda => (2, 512, 4096, 151_552),
        _ => (2, 64, 64, 1000),
    };
    tch::manual_seed(1);
    let weight = (Tensor::randn([vocab, hidden], (kind, device)) * 0.02).set_requires_grad(false);
    let x = Tensor::randn([batch, seq, hidden], (kind, device));
    let labels = Tensor::randint(vocab, [batch, seq], (Kind::Int64, device));
    let _ = labels.narrow(1, 0, 16).fill_(-100);
    let denom = labels.ne(-100).sum(Kind::Int64).int64_value(&[]) as f64;
    let head = Head {
        weight: weight.shallow_clone(),
    };
    let run = |fused: bool| {
        let leaf = x.detach().set_requires_grad(true);
        let h = &leaf * 1.0;
        let _ = ops::cuda_reset_peak_memory_stats();
        let before = ops::cuda_memory_stats().ok().flatten();
        sync(device);
        let t0 = Instant::now();
        let out = if fused {
            fused_lm_loss(&h, &weight, &labels, denom, true, LOSS_CHUNK_TOKENS)
                .map_err(|e| e.to_string())
        } else {
            Ok(chunked_lm_loss_plain(
                &head,
                &h,
                &labels,
                denom,
                true,
                LOSS_CHUNK_TOKENS,
            ))
        };
        sync(device);
        let seconds = t0.elapsed().as_secs_f64();
        let after = ops::cuda_memory_stats().ok().flatten();
        let extra_mb = match (before, after) {
            (Some(b), Some(a)) => Some((a.peak_allocated - b.allocated) as f64 / 1048576.0),
            _ => None,
        };
        out.map(|o| (o, leaf.grad(), seconds, extra_mb))
    };
    // One untimed pass each first (kernel selection, allocator warm-up).
    let (plain, fused) = match (run(false).and(run(false)), run(true).and(run(true))) {
        (Ok(p), Ok(f)) => (p, f),
        (_, Err(e)) | (Err(e), _) => return json!({"ok": false, "error": e}),
    };
    // Alternating timed passes (OPS_CHECK_REPS, default 3): medians resist a
    // machine whose load changes under the run.
    let reps: usize = std::env::var("OPS_CHECK_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let (mut tp, mut tf) = (vec![plain.2], vec![fused.2]);
    for _ in 1..reps {
        if let (Ok(p), Ok(f)) = (run(false), run(true)) {
            tp.push(p.2);
            tf.push(f.2);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (median_plain, median_fused) = (median(&mut tp), median(&mut tf));
    let loss_diff = (fused.0.loss - plain.0.loss).abs();
    let grad_diff = rel_diff(&fused.1, &plain.1);
    let tol = if cuda { 2e-2 } else { 1e-5 };
    json!({
        "ok": loss_diff <= 1e-6 * plain.0.loss.abs().max(1.0) && grad_diff <= tol,
        "dtype": format!("{kind:?}"),
        "shape": {"batch": batch, "seq": seq, "hidden": hidden, "vocab": vocab},
        "loss": {"plain": plain.0.loss, "fused": fused.0.loss},
        "entropy": {"plain": plain.0.entropy, "fused": fused.0.entropy},
        "accuracy": {"plain": plain.0.accuracy, "fused": fused.0.accuracy},
        "hidden_grad_rel_diff": grad_diff,
        "median_seconds_fwd_bwd": {"plain": median_plain, "fused": median_fused, "passes": tp.len()},
        "peak_extra_allocated_mb": {"plain": plain.3, "fused": fused.3},
    })
}

fn main() {
    let device = Device::cuda_if_available();
    let attention = attention_check(device);
    let loss = loss_check(device);
    let memory = match ops::cuda_memory_stats() {
        Ok(Some(m)) => {
            json!({"ok": m.peak_allocated >= m.allocated && m.peak_reserved >= m.reserved,
            "max_memory_allocated": m.peak_allocated, "max_memory_reserved": m.peak_reserved})
        }
        Ok(None) => json!({"ok": !matches!(device, Device::Cuda(_)), "available": false}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    let failed = [&attention, &loss, &memory]
        .iter()
        .any(|r| r["ok"].as_bool() == Some(false));
    println!(
        "{}",
        json!({"device": format!("{device:?}"), "cuda_ops_built": ops::has_cuda_ops(),
            "varlen_attention": attention, "fused_lm_loss": loss, "cuda_memory_stats": memory})
    );
    if failed {
        std::process::exit(1);
    }
}
