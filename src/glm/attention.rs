//! `GlmAttention`: grouped-query attention (32 query heads share 2 key/value
//! heads in GLM-4-9B) with partial rotary embeddings and libtorch's SDPA.

use super::rotary::Rotary;
use super::GlmConfig;
use tch::{nn, Tensor};
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
        }
    }

    /// # Shapes
    /// `x`: `[batch, seq, hidden]`; `cos`/`sin`: `[batch, seq, rotary_dim]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Tensor {
        let (b, t, _) = x
            .size3()
            .expect("hidden states must be [batch, seq, hidden]");
        let heads = |proj: &Linear, n: i64| {
            proj.forward_t(x, train)
                .view([b, t, n, self.head_dim])
                .transpose(1, 2)
        };
        let q = rotary.apply(&heads(&self.q_proj, self.num_heads), cos, sin);
        let k = rotary.apply(&heads(&self.k_proj, self.num_kv_heads), cos, sin);
        let v = heads(&self.v_proj, self.num_kv_heads);
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
        };
        let out = out
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward_t(&out, train)
    }
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
