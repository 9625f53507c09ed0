//! `GlmAttention`: grouped-query attention (32 query heads share 2 key/value
//! heads in GLM-4-9B) with partial rotary embeddings and libtorch's SDPA.

use super::rotary::Rotary;
use super::GlmConfig;
use tch::{nn, Tensor};
use trl_like::fused::FusedLinears;
use trl_like::modeling::KvCache;
use trl_like::nn::Linear;

/// Which keys each query may see.
pub enum AttentionMask {
    /// Every query sees every key (a single decoding step without padding).
    Full,
    /// Plain causal masking with no cache and no padding: lets SDPA pick its
    /// fastest kernel (flash on CUDA), as no dense mask is materialised.
    Causal,
    /// Dense boolean mask `[batch, 1, q_len, kv_len]`, true = may attend.
    Dense(Tensor),
    /// A padding-free row `[1, total]` of sequences of these lengths back to back:
    /// causal attention within each, none across. Runs SDPA with `is_causal`
    /// per sequence (sequences of equal length share one call), so no
    /// `total × total` mask is built and the fast kernels stay usable; on
    /// CUDA in bf16/fp16, one variable-length flash kernel for the whole row
    /// (`trl_like::ops::varlen_causal_attention`).
    Segments(Vec<i64>),
}

/// What every layer of one forward pass shares: the rotary embedding, its
/// cos/sin tables for the batch's positions, and the attention mask.
#[derive(Clone, Copy)]
pub struct Positions<'a> {
    pub rotary: &'a Rotary,
    /// `[batch, seq, rotary_dim]`.
    pub cos: &'a Tensor,
    /// `[batch, seq, rotary_dim]`.
    pub sin: &'a Tensor,
    pub mask: &'a AttentionMask,
}

impl AttentionMask {
    /// The mask for [`CausalLMInput::seq_lens`](trl_like::modeling::CausalLMInput):
    /// checks that they describe the `[batch, seq]` input (one row, positive
    /// lengths summing to `seq`). These come from the collator, never from user
    /// input, so a mismatch is a bug in the caller.
    pub fn segments(lens: &[i64], batch: i64, seq: i64, has_cache: bool) -> Self {
        assert!(
            batch == 1 && lens.iter().all(|&l| l > 0) && lens.iter().sum::<i64>() == seq,
            "seq_lens {lens:?} do not describe a padding-free [1, {seq}] row (batch {batch})"
        );
        assert!(
            !has_cache,
            "seq_lens (padding-free rows) are for training passes without a KV cache"
        );
        if lens.len() <= 1 {
            AttentionMask::Causal
        } else {
            AttentionMask::Segments(lens.to_vec())
        }
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    layer_idx: usize,
    /// q/k/v weights in one buffer when the base is frozen ([`Attention::fuse_frozen_qkv`]).
    qkv: Option<FusedLinears>,
}

impl Attention {
    pub fn new(path: nn::Path, cfg: &GlmConfig, layer_idx: usize) -> Self {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Self {
            q_proj: Linear::new(&path / "q_proj", h, nh * hd, cfg.attention_bias),
            k_proj: Linear::new(&path / "k_proj", h, nkv * hd, cfg.attention_bias),
            v_proj: Linear::new(&path / "v_proj", h, nkv * hd, cfg.attention_bias),
            o_proj: Linear::new(&path / "o_proj", nh * hd, h, false),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            layer_idx,
            qkv: None,
        }
    }

    /// Runs q/k/v as one GEMM from now on, if their weights are frozen plain
    /// tensors (see [`FusedLinears`]; the weights become views of one buffer,
    /// nothing else changes). Returns whether they are fused.
    pub fn fuse_frozen_qkv(&mut self) -> bool {
        let current = self
            .qkv
            .as_ref()
            .is_some_and(|f| f.is_current(&[&self.q_proj, &self.k_proj, &self.v_proj]));
        if !current {
            self.qkv =
                FusedLinears::pack(&mut [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj]);
        }
        self.qkv.is_some()
    }

    /// Whether q/k/v run as one GEMM (fused, and their weights still the
    /// fused buffer's frozen views).
    pub fn qkv_fused(&self) -> bool {
        self.qkv
            .as_ref()
            .is_some_and(|f| f.is_current(&[&self.q_proj, &self.k_proj, &self.v_proj]))
    }

    /// The q/k/v projections of `x`: one GEMM when fused and still current,
    /// else one per projection.
    fn project_qkv(&self, x: &Tensor, train: bool) -> (Tensor, Tensor, Tensor) {
        let linears = [&self.q_proj, &self.k_proj, &self.v_proj];
        if let Some(mut out) = self
            .qkv
            .as_ref()
            .and_then(|f| f.forward_t(&linears, x, train))
        {
            let v = out.pop().expect("three outputs");
            let k = out.pop().expect("three outputs");
            let q = out.pop().expect("three outputs");
            return (q, k, v);
        }
        (
            self.q_proj.forward_t(x, train),
            self.k_proj.forward_t(x, train),
            self.v_proj.forward_t(x, train),
        )
    }

    /// # Shapes
    /// `x`: `[batch, seq, hidden]`; `pos.cos`/`pos.sin`: `[batch, seq, rotary_dim]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let Positions {
            rotary,
            cos,
            sin,
            mask,
        } = *pos;
        let (b, t, _) = x
            .size3()
            .expect("hidden states must be [batch, seq, hidden]");
        let (q, k, v) = self.project_qkv(x, train);
        let heads = |y: Tensor, n: i64| y.view([b, t, n, self.head_dim]).transpose(1, 2);
        let q = rotary.apply(&heads(q, self.num_heads), cos, sin);
        let k = rotary.apply(&heads(k, self.num_kv_heads), cos, sin);
        let v = heads(v, self.num_kv_heads);
        let (k, v) = match cache {
            Some(cache) => cache.update(self.layer_idx, k, v),
            None => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let gqa = self.num_heads != self.num_kv_heads;
        let out = match mask {
            AttentionMask::Full => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, scale, gqa,
            ),
            AttentionMask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, scale, gqa,
            ),
            AttentionMask::Dense(m) => {
                Tensor::scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, scale, gqa)
            }
            AttentionMask::Segments(lens) => segment_attention(&q, &k, &v, lens, scale, gqa),
        };
        let out = out
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward_t(&out, train)
    }
}

/// Causal attention within each segment of a padding-free row, none across.
///
/// Segments of the same length are stacked along the batch dimension and go
/// through one `is_causal` SDPA call; the outputs are put back in row order.
/// Every query sees exactly the keys it would see if its sequence ran alone,
/// so the result matches separate forward passes.
///
/// # Shapes
/// `q`: `[1, heads, total, head_dim]`, `k`/`v`: `[1, kv_heads, total, head_dim]`,
/// `lens` summing to `total` → `[1, heads, total, head_dim]`.
fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[i64],
    scale: f64,
    gqa: bool,
) -> Tensor {
    // On CUDA in bf16/fp16: one flash kernel for the whole row (cumulative
    // sequence lengths) instead of one SDPA call per length. Never on CPU.
    if trl_like::ops::varlen_attention_supported(q.device(), q.kind(), q.size()[3]) {
        match trl_like::ops::varlen_causal_attention(q, k, v, lens, scale) {
            Ok(out) => return out,
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| log::warn!("{e}; using one SDPA call per sequence length"));
            }
        }
    }
    let starts: Vec<i64> = lens
        .iter()
        .scan(0, |acc, &l| {
            let s = *acc;
            *acc += l;
            Some(s)
        })
        .collect();
    // Segment indices by length, in order of first appearance.
    let mut groups: Vec<(i64, Vec<usize>)> = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        match groups.iter_mut().find(|(l, _)| *l == len) {
            Some((_, members)) => members.push(i),
            None => groups.push((len, vec![i])),
        }
    }
    let mut pieces: Vec<Option<Tensor>> = (0..lens.len()).map(|_| None).collect();
    for (len, members) in &groups {
        let gather = |t: &Tensor| {
            let parts: Vec<Tensor> = members
                .iter()
                .map(|&i| t.narrow(2, starts[i], *len))
                .collect();
            if parts.len() == 1 {
                parts.into_iter().next().expect("one part")
            } else {
                Tensor::cat(&parts, 0)
            }
        };
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &gather(q),
            &gather(k),
            &gather(v),
            None,
            0.0,
            true,
            scale,
            gqa,
        );
        for (j, &i) in members.iter().enumerate() {
            pieces[i] = Some(out.narrow(0, j as i64, 1));
        }
    }
    let pieces: Vec<Tensor> = pieces
        .into_iter()
        .map(|p| p.expect("every segment is in a group"))
        .collect();
    Tensor::cat(&pieces, 2)
}

/// Builds the mask for `q_len` new queries after `past_len` cached positions.
///
/// Query `i` (absolute position `past_len + i`) may see key `j` when `j <= past_len + i`
/// and key `j` is not padding. A padding query would then see no key at all, which
/// some SDPA kernels turn into NaN; it is allowed to see itself instead (its output
/// is never used, as no real query attends to a padding key).
///
/// # Shapes
/// `padding_mask`: `[batch, past_len + q_len]`, 1 = token → `[batch, 1, q_len, past_len + q_len]` bool.
pub fn build_mask(
    padding_mask: Option<&Tensor>,
    past_len: i64,
    q_len: i64,
    device: tch::Device,
) -> AttentionMask {
    if padding_mask.is_none() {
        if q_len == 1 {
            return AttentionMask::Full;
        }
        if past_len == 0 {
            return AttentionMask::Causal;
        }
    }
    let kv_len = past_len + q_len;
    let opts = (tch::Kind::Int64, device);
    let query_pos = (Tensor::arange(q_len, opts) + past_len).view([q_len, 1]);
    let key_pos = Tensor::arange(kv_len, opts).view([1, kv_len]);
    let causal = key_pos.le_tensor(&query_pos);
    let mask = match padding_mask {
        None => causal.view([1, 1, q_len, kv_len]),
        Some(pm) => {
            let keys_ok = pm.ne(0).view([-1, 1, 1, kv_len]);
            let itself = key_pos.eq_tensor(&query_pos).view([1, 1, q_len, kv_len]);
            causal
                .view([1, 1, q_len, kv_len])
                .logical_and(&keys_ok)
                .logical_or(&itself)
        }
    };
    AttentionMask::Dense(mask)
}
