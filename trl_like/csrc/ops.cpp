// Autograd operations tch cannot express (it has no custom autograd
// functions), behind a small C interface that `trl_like::ops` wraps:
//
// - the fused LM head + cross-entropy of SFT: one autograd node that holds
//   one chunk of logits at a time and forms the chunk's gradient while it has
//   them, with the entropy / token-accuracy sums TRL logs;
// - variable-length causal attention over a padding-free row on CUDA: one
//   flash-attention kernel with cumulative sequence lengths for the whole row;
// - the CUDA caching allocator's statistics (what torch.cuda.max_memory_*
//   report).
//
// As in c10d_shim.cpp every entry point catches every exception and returns
// it as a malloc'd message (freed with trl_ops_free_error), so no C++
// exception unwinds into Rust. Tensors cross as tch's `C_tensor*`, which is a
// `torch::Tensor*`; new tensors are returned `new`'d, for tch's
// `Tensor::from_ptr` to own.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#ifdef TRL_OPS_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

char* copy_message(const char* what) {
  const char* text = what ? what : "unknown C++ exception";
  char* out = static_cast<char*>(std::malloc(std::strlen(text) + 1));
  if (out) std::strcpy(out, text);
  return out;
}

// Runs `body`, turning any exception into an error message; returns 0 on success.
template <typename F>
int guarded(char** error, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    *error = copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *error = copy_message(e.what());
  } catch (...) {
    *error = copy_message(nullptr);
  }
  return 1;
}

// ---------------------------------------------------------------------------
// Fused LM head + cross-entropy.
//
// The forward mirrors trainer/loss.rs's plain path op for op (same chunks
// along the sequence, the same libtorch calls in the same order), so the
// per-chunk losses and statistics are bit-identical to it. When gradients
// are wanted, each chunk's gradient is formed right there, from the chunk's
// own log-probabilities turned in place into softmax − one_hot: the logits
// are never kept past their chunk and never recomputed (a recompute in the
// backward would cost one more [tokens, hidden] × [hidden, vocab] product
// per chunk). The backward only scales the stored gradients by the incoming
// scalar gradient, which the loss is linear in.
// ---------------------------------------------------------------------------

// Positions per chunk: `chunk_tokens` tokens spread over the batch rows.
int64_t chunk_positions(int64_t chunk_tokens, int64_t batch) {
  return std::max<int64_t>(chunk_tokens / std::max<int64_t>(batch, 1), 1);
}

struct FusedLmLoss : public torch::autograd::Function<FusedLmLoss> {
  // hidden [b, t, h] (model dtype), weight [vocab, h], labels [b, t] int64.
  // Returns the loss (fp32 scalar: summed token loss / denom, differentiable)
  // and the non-differentiable per-chunk values [n, 4]: the chunk's loss,
  // entropy sum, correct predictions and tokens that take loss.
  // `with_grad`: autograd will want gradients (grad mode was on at the call).
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& hidden,
      const at::Tensor& weight,
      const at::Tensor& labels,
      double denom,
      int64_t chunk_tokens,
      int64_t ignore_index,
      bool with_grad) {
    const int64_t b = hidden.size(0);
    const int64_t positions = hidden.size(1) - 1;  // position i predicts label i + 1
    const int64_t hsize = hidden.size(2);
    const int64_t chunk = chunk_positions(chunk_tokens, b);
    const bool want_hidden = with_grad && hidden.requires_grad();
    const bool want_weight = with_grad && weight.requires_grad();
    at::Tensor grad_hidden = want_hidden ? at::zeros_like(hidden) : at::Tensor();
    at::Tensor grad_weight = want_weight ? at::zeros_like(weight) : at::Tensor();
    std::vector<at::Tensor> rows;
    for (int64_t start = 0; start < positions; start += chunk) {
      const int64_t len = std::min(chunk, positions - start);
      const at::Tensor h = hidden.narrow(1, start, len);
      const at::Tensor y = labels.narrow(1, start + 1, len).reshape({-1});
      // Logits in fp32 whatever the model dtype, as transformers upcasts them.
      at::Tensor logits_md = at::linear(h, weight);
      const auto head_dtype = logits_md.scalar_type();
      at::Tensor logits = logits_md.to(at::kFloat);
      logits_md.reset();
      const int64_t v = logits.size(2);
      at::Tensor logp = logits.reshape({-1, v}).log_softmax(-1, at::kFloat);
      // At most two chunk-sized fp32 buffers at a time.
      logits.reset();
      const at::Tensor loss =
          at::nll_loss_nd(logp, y, {}, at::Reduction::Sum, ignore_index) / denom;
      const at::Tensor valid = y.ne(ignore_index);
      const at::Tensor valid_f = valid.to(at::kFloat);
      at::Tensor p_logp = logp.exp();
      p_logp.mul_(logp);
      const at::Tensor per_token = -p_logp.sum({-1}, false, at::kFloat);
      p_logp.reset();
      rows.push_back(at::stack({
          loss,
          (per_token * valid_f).sum(at::kFloat),
          logp.argmax(-1, false).eq(y).logical_and(valid).sum(at::kFloat),
          valid_f.sum(at::kFloat),
      }));
      if (!(want_hidden || want_weight)) continue;
      // d loss / d logits = (softmax − one_hot(label)) / denom for tokens that
      // take loss, 0 for the others; then the fp32 cast's backward returns it
      // in the head's dtype, as autograd would.
      at::Tensor grad = logp.exp_();
      logp = at::Tensor();
      const at::Tensor target = y.masked_fill(valid.logical_not(), 0).unsqueeze(1);
      grad.scatter_add_(1, target, at::full({grad.size(0), 1}, -1.0, grad.options()));
      grad.mul_((valid_f / denom).unsqueeze(1));
      const at::Tensor g = grad.to(head_dtype);
      grad = at::Tensor();
      if (want_hidden) {
        grad_hidden.narrow(1, start, len).copy_(at::matmul(g.view({-1, len, v}), weight));
      }
      if (want_weight) {
        grad_weight.addmm_(g.t(), h.reshape({-1, hsize}));
      }
    }
    const auto fopts = hidden.options().dtype(at::kFloat);
    at::Tensor per_chunk = rows.empty() ? at::zeros({0, 4}, fopts) : at::stack(rows);
    at::Tensor total = per_chunk.select(1, 0).sum();
    ctx->saved_data["grad_hidden"] = grad_hidden;
    ctx->saved_data["grad_weight"] = grad_weight;
    ctx->mark_non_differentiable({per_chunk});
    return {total, per_chunk};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    at::Tensor grad_hidden = ctx->saved_data["grad_hidden"].toTensor();
    at::Tensor grad_weight = ctx->saved_data["grad_weight"].toTensor();
    const at::Tensor& g = grad_outputs[0];
    auto scaled = [&](const at::Tensor& grad, int index) {
      if (!ctx->needs_input_grad(index)) return at::Tensor();
      TORCH_CHECK(grad.defined(),
                  "fused LM loss: a gradient was requested that the forward did not form "
                  "(grad mode was off when it ran)");
      return g.defined() ? grad * g.to(grad.scalar_type()) : at::zeros_like(grad);
    };
    return {scaled(grad_hidden, 0), scaled(grad_weight, 1), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------------------
// Variable-length causal attention (CUDA flash kernel).
// ---------------------------------------------------------------------------

struct VarlenCausalAttention : public torch::autograd::Function<VarlenCausalAttention> {
  // q [total, heads, d], k / v [total, kv_heads, d] (kv_heads divides heads:
  // the kernel shares each kv head among its query group itself), cu_seqlens
  // int32 [n + 1] on the device. Returns [total, heads, d].
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& q,
      const at::Tensor& k,
      const at::Tensor& v,
      const at::Tensor& cu_seqlens,
      int64_t max_len,
      double scale) {
    auto result = at::_flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, /*dropout_p=*/0.0,
        /*is_causal=*/true, /*return_debug_mask=*/false, scale);
    at::Tensor out = std::get<0>(result);
    ctx->save_for_backward(
        {q, k, v, out, std::get<1>(result), cu_seqlens, std::get<2>(result), std::get<3>(result)});
    ctx->saved_data["max_len"] = max_len;
    ctx->saved_data["scale"] = scale;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const int64_t max_len = ctx->saved_data["max_len"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    auto grads = at::_flash_attention_backward(
        grad_outputs[0].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5], s[5], max_len, max_len,
        /*dropout_p=*/0.0, /*is_causal=*/true, s[6], s[7], scale);
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor& as_tensor(void* ptr) { return *static_cast<at::Tensor*>(ptr); }

}  // namespace

extern "C" {

void trl_ops_free_error(char* error) { std::free(error); }

// The fused LM-head cross-entropy (see FusedLmLoss). On success `*loss`
// (fp32 scalar, differentiable) and `*stats` ([n, 4] fp32) are new tensors.
int trl_ops_fused_lm_loss(
    void* hidden,
    void* weight,
    void* labels,
    double denom,
    int64_t chunk_tokens,
    int64_t ignore_index,
    void** loss,
    void** stats,
    char** error) {
  return guarded(error, [&] {
    const at::Tensor& h = as_tensor(hidden);
    const at::Tensor& w = as_tensor(weight);
    const at::Tensor& y = as_tensor(labels);
    TORCH_CHECK(h.dim() == 3, "hidden states must be [batch, seq, hidden], got ", h.sizes());
    TORCH_CHECK(w.dim() == 2 && w.size(1) == h.size(2),
                "lm_head weight must be [vocab, ", h.size(2), "], got ", w.sizes());
    TORCH_CHECK(y.dim() == 2 && y.size(0) == h.size(0) && y.size(1) == h.size(1),
                "labels must be [batch, seq] = ", h.sizes().slice(0, 2), ", got ", y.sizes());
    TORCH_CHECK(y.scalar_type() == at::kLong, "labels must be int64, got ", y.scalar_type());
    TORCH_CHECK(chunk_tokens > 0, "chunk_tokens must be positive, got ", chunk_tokens);
    const bool with_grad = at::GradMode::is_enabled();
    auto out = FusedLmLoss::apply(h, w, y, denom, chunk_tokens, ignore_index, with_grad);
    *loss = new at::Tensor(std::move(out[0]));
    *stats = new at::Tensor(std::move(out[1]));
  });
}

// 1 when this build carries the CUDA parts (flash attention, allocator statistics).
int trl_ops_has_cuda() {
#ifdef TRL_OPS_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// Causal attention within each of `num_seqs` sequences laid back to back.
// q [total, heads, d], k / v [total, kv_heads, d] on CUDA in fp16 / bf16;
// `seq_lens` on the host. `*out` = new [total, heads, d].
int trl_ops_varlen_causal_attention(
    void* q,
    void* k,
    void* v,
    const int64_t* seq_lens,
    int64_t num_seqs,
    double scale,
    void** out,
    char** error) {
  return guarded(error, [&] {
    const at::Tensor& qt = as_tensor(q);
    TORCH_CHECK(qt.is_cuda(), "variable-length attention runs on CUDA only");
    TORCH_CHECK(num_seqs > 0, "variable-length attention needs at least one sequence");
    std::vector<int32_t> cu(static_cast<size_t>(num_seqs) + 1, 0);
    int64_t max_len = 0;
    for (int64_t i = 0; i < num_seqs; ++i) {
      TORCH_CHECK(seq_lens[i] > 0, "sequence lengths must be positive, got ", seq_lens[i]);
      cu[i + 1] = static_cast<int32_t>(cu[i] + seq_lens[i]);
      max_len = std::max(max_len, seq_lens[i]);
    }
    TORCH_CHECK(cu.back() == qt.size(0), "sequence lengths sum to ", cu.back(), " but q has ",
                qt.size(0), " tokens");
    at::Tensor cu_seqlens =
        at::tensor(cu, at::TensorOptions().dtype(at::kInt)).to(qt.device());
    auto result = VarlenCausalAttention::apply(
        qt.contiguous(), as_tensor(k).contiguous(), as_tensor(v).contiguous(), cu_seqlens,
        max_len, scale);
    *out = new at::Tensor(std::move(result[0]));
  });
}

// The current CUDA device's caching-allocator statistics, in bytes:
// stats[0..4] = allocated now, peak allocated, reserved now, peak reserved
// (torch.cuda.memory_allocated / max_memory_allocated / memory_reserved /
// max_memory_reserved). Returns 1 with `stats` filled, 0 when there is no
// CUDA device (or this build has no CUDA parts), -1 with `*error` set.
int trl_ops_cuda_memory_stats(int64_t* stats, char** error) {
#ifdef TRL_OPS_WITH_CUDA
  int available = 0;
  int failed = guarded(error, [&] {
    if (c10::cuda::device_count() == 0) return;
    available = 1;
    auto* allocator = c10::cuda::CUDACachingAllocator::get();
    if (allocator == nullptr || !allocator->initialized()) {
      // Nothing has touched the device yet: nothing allocated or reserved.
      std::fill(stats, stats + 4, 0);
      return;
    }
    const auto s = allocator->getDeviceStats(c10::cuda::current_device());
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    stats[0] = s.allocated_bytes[agg].current;
    stats[1] = s.allocated_bytes[agg].peak;
    stats[2] = s.reserved_bytes[agg].current;
    stats[3] = s.reserved_bytes[agg].peak;
  });
  return failed ? -1 : available;
#else
  (void)stats;
  (void)error;
  return 0;
#endif
}

// torch.cuda.reset_peak_memory_stats() for the current device. Returns 1 when
// reset, 0 when there is no CUDA device, -1 with `*error` set.
int trl_ops_cuda_reset_peak_memory_stats(char** error) {
#ifdef TRL_OPS_WITH_CUDA
  int available = 0;
  int failed = guarded(error, [&] {
    if (c10::cuda::device_count() == 0) return;
    available = 1;
    auto* allocator = c10::cuda::CUDACachingAllocator::get();
    if (allocator != nullptr && allocator->initialized()) {
      allocator->resetPeakStats(c10::cuda::current_device());
    }
  });
  return failed ? -1 : available;
#else
  (void)error;
  return 0;
#endif
}

}  // extern "C"
