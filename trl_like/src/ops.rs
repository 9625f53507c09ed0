//! Autograd operations written in C++ (`csrc/ops.cpp`), for what tch cannot
//! express: it has no custom autograd functions, so a fused operation whose
//! backward is not the composition of its forward's ops needs a
//! `torch::autograd::Function` on the C++ side. The tensors it returns carry
//! their autograd graph into Rust ([`Tensor::from_ptr`]).
//!
//! - [`fused_lm_loss`]: the LM head + cross-entropy of SFT in one node that
//!   holds one chunk of logits at a time and forms each chunk's gradient
//!   while it has them.
//! - [`varlen_causal_attention`]: causal attention over a padding-free row in
//!   one CUDA flash-attention kernel.
//! - [`cuda_memory_stats`] / [`cuda_reset_peak_memory_stats`]: the CUDA
//!   caching allocator's statistics, `torch.cuda.max_memory_allocated` /
//!   `max_memory_reserved`.

use std::ffi::{c_char, c_int, c_void, CStr};
use tch::{Device, Kind, Tensor};

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// libtorch raised an error inside the operation.
    #[error("{op}: {message}")]
    Torch { op: &'static str, message: String },
    /// The operation does not apply to these inputs (checked before calling libtorch).
    #[error("{op}: {message}")]
    Unsupported { op: &'static str, message: String },
}

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn trl_ops_fused_lm_loss(
        hidden: *mut c_void,
        weight: *mut c_void,
        labels: *mut c_void,
        denom: f64,
        chunk_tokens: i64,
        ignore_index: i64,
        loss: *mut *mut c_void,
        stats: *mut *mut c_void,
        error: *mut *mut c_char,
    ) -> c_int;
    fn trl_ops_has_cuda() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn trl_ops_varlen_causal_attention(
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        seq_lens: *const i64,
        num_seqs: i64,
        scale: f64,
        out: *mut *mut c_void,
        error: *mut *mut c_char,
    ) -> c_int;
    fn trl_ops_cuda_memory_stats(stats: *mut i64, error: *mut *mut c_char) -> c_int;
    fn trl_ops_cuda_reset_peak_memory_stats(error: *mut *mut c_char) -> c_int;
    fn trl_ops_free_error(error: *mut c_char);
}

/// Takes ownership of a message the C++ side allocated.
fn take_error(op: &'static str, error: *mut c_char) -> OpsError {
    let message = if error.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: ops.cpp returns a NUL-terminated malloc'd string, freed right after copying.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .trim()
            .to_string();
        unsafe { trl_ops_free_error(error) };
        text
    };
    OpsError::Torch { op, message }
}

/// tch's `C_tensor*` is a `torch::Tensor*`; the C++ side only reads through it.
fn raw(t: &Tensor) -> *mut c_void {
    t.as_ptr() as *mut c_void
}

/// Takes a tensor the C++ side `new`'d.
///
/// # Safety
/// `ptr` must be a fresh `at::Tensor*` from ops.cpp, owned by nobody else.
unsafe fn owned(ptr: *mut c_void) -> Tensor {
    Tensor::from_ptr(ptr as *mut torch_sys::C_tensor)
}

/// What [`fused_lm_loss`] returns.
#[derive(Debug)]
pub struct FusedLmLoss {
    /// fp32 scalar: the summed token loss / `denom`, differentiable with
    /// respect to the hidden states (and the head weight when it requires
    /// grad); the tensor to backpropagate.
    pub loss: Tensor,
    /// `[chunks, 4]` fp32, no gradient: per chunk its summed token loss /
    /// `denom`, the summed entropy of the predicted distributions at loss
    /// tokens, the loss tokens whose argmax is the label, and the loss tokens.
    pub stats: Tensor,
}

/// transformers' `ForCausalLMLoss` (logits in fp32, shifted labels,
/// `ignore_index` skipped, summed) / `denom`, plus TRL's entropy and accuracy
/// sums, `chunk_tokens` tokens at a time, as one autograd node that holds one
/// chunk of logits (`chunk_tokens × vocab` fp32) at a time. Under grad mode
/// each chunk's gradient is formed as soon as its log-probabilities exist
/// (softmax − one-hot, in place), so the logits are neither kept for the
/// backward nor recomputed in it; the backward only scales the stored
/// gradients. The head weight gets a gradient only if it requires one.
///
/// Chunks run along the sequence (`chunk_tokens / batch` positions over all
/// rows), exactly as [`crate::trainer::loss::chunked_lm_loss_plain`], whose
/// per-chunk values these are bit for bit.
///
/// # Shapes
/// `hidden`: `[batch, seq, hidden]`; `weight`: `[vocab, hidden]`; `labels`:
/// `[batch, seq]` int64 → `loss` `[]`, `stats` `[chunks, 4]`, with
/// `chunks = ceil((seq − 1) / max(chunk_tokens / batch, 1))`.
pub fn fused_lm_loss(
    hidden: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    denom: f64,
    chunk_tokens: i64,
    ignore_index: i64,
) -> Result<FusedLmLoss, OpsError> {
    const OP: &str = "fused LM-head cross-entropy";
    let mut loss: *mut c_void = std::ptr::null_mut();
    let mut stats: *mut c_void = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the tensors outlive the call; the shim only reads them and
    // returns new tensors through the out pointers on success.
    let rc = unsafe {
        trl_ops_fused_lm_loss(
            raw(hidden),
            raw(weight),
            raw(labels),
            denom,
            chunk_tokens,
            ignore_index,
            &mut loss,
            &mut stats,
            &mut error,
        )
    };
    if rc != 0 {
        return Err(take_error(OP, error));
    }
    // SAFETY: on success both are fresh tensors owned by nobody else.
    Ok(unsafe {
        FusedLmLoss {
            loss: owned(loss),
            stats: owned(stats),
        }
    })
}

/// Whether this build carries the CUDA operations (the CUDA runtime headers
/// were found when it was compiled).
pub fn has_cuda_ops() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { trl_ops_has_cuda() != 0 }
}

/// Whether [`varlen_causal_attention`] can run on tensors of this device,
/// dtype and head size: CUDA, fp16 / bf16, a head size the flash kernel takes
/// (a multiple of 8, at most 256), and a build with the CUDA operations.
pub fn varlen_attention_supported(device: Device, kind: Kind, head_dim: i64) -> bool {
    matches!(device, Device::Cuda(_))
        && matches!(kind, Kind::BFloat16 | Kind::Half)
        && head_dim % 8 == 0
        && head_dim <= 256
        && has_cuda_ops()
}

/// Causal attention within each sequence of a padding-free row, none across,
/// in one flash-attention kernel with cumulative sequence lengths (CUDA only;
/// see [`varlen_attention_supported`]). Grouped-query attention is the
/// kernel's own: `kv_heads` must divide `heads`. No dropout.
///
/// # Shapes
/// `q`: `[1, heads, total, head_dim]`, `k`/`v`: `[1, kv_heads, total, head_dim]`,
/// `seq_lens` summing to `total` → `[1, heads, total, head_dim]`.
pub fn varlen_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lens: &[i64],
    scale: f64,
) -> Result<Tensor, OpsError> {
    const OP: &str = "variable-length causal attention";
    let (_, _, _, head_dim) = q.size4().map_err(|e| OpsError::Unsupported {
        op: OP,
        message: format!("q must be [1, heads, total, head_dim]: {e}"),
    })?;
    if !varlen_attention_supported(q.device(), q.kind(), head_dim) {
        return Err(OpsError::Unsupported {
            op: OP,
            message: format!(
                "needs CUDA, fp16/bf16 and head_dim a multiple of 8 up to 256 (got {:?}, {:?}, head_dim {head_dim}, CUDA ops built: {})",
                q.device(),
                q.kind(),
                has_cuda_ops()
            ),
        });
    }
    // [1, heads, total, d] → the kernel's [total, heads, d].
    let tokens_first = |t: &Tensor| t.squeeze_dim(0).transpose(0, 1);
    let (q3, k3, v3) = (tokens_first(q), tokens_first(k), tokens_first(v));
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the tensors and `seq_lens` outlive the call; the shim only reads them.
    let rc = unsafe {
        trl_ops_varlen_causal_attention(
            raw(&q3),
            raw(&k3),
            raw(&v3),
            seq_lens.as_ptr(),
            seq_lens.len() as i64,
            scale,
            &mut out,
            &mut error,
        )
    };
    if rc != 0 {
        return Err(take_error(OP, error));
    }
    // SAFETY: on success `out` is a fresh tensor owned by nobody else.
    let out = unsafe { owned(out) };
    Ok(out.transpose(0, 1).unsqueeze(0))
}

/// The CUDA caching allocator's counters for the current device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemoryStats {
    /// `torch.cuda.memory_allocated()`.
    pub allocated: i64,
    /// `torch.cuda.max_memory_allocated()`: the peak since start or the last reset.
    pub peak_allocated: i64,
    /// `torch.cuda.memory_reserved()`.
    pub reserved: i64,
    /// `torch.cuda.max_memory_reserved()`.
    pub peak_reserved: i64,
}

/// The allocator statistics of the current CUDA device; `None` when there is
/// no CUDA device (or this build has no CUDA operations).
pub fn cuda_memory_stats() -> Result<Option<CudaMemoryStats>, OpsError> {
    let mut s = [0i64; 4];
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: `s` holds the four values the shim writes.
    match unsafe { trl_ops_cuda_memory_stats(s.as_mut_ptr(), &mut error) } {
        1 => Ok(Some(CudaMemoryStats {
            allocated: s[0],
            peak_allocated: s[1],
            reserved: s[2],
            peak_reserved: s[3],
        })),
        0 => Ok(None),
        _ => Err(take_error("CUDA memory statistics", error)),
    }
}

/// `torch.cuda.reset_peak_memory_stats()` on the current device; `false`
/// when there is no CUDA device.
pub fn cuda_reset_peak_memory_stats() -> Result<bool, OpsError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: only the error pointer is written.
    match unsafe { trl_ops_cuda_reset_peak_memory_stats(&mut error) } {
        1 => Ok(true),
        0 => Ok(false),
        _ => Err(take_error("CUDA memory statistics reset", error)),
    }
}
