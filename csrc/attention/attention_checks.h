// The shape and dtype contract of paged_decode_attention, shared by its CPU and CUDA bindings. (The
// values - lengths, starts, slots - are checked by the CPU kernel, which reads them on the host anyway;
// the CUDA kernel gives NaN rows for the values the CPU refuses, as reading them back would stall the
// device every layer.)
#pragma once

#include <ATen/ATen.h>

namespace alphalora::attention {

inline void check_paged_decode_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                      const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& starts) {
  TORCH_CHECK(q.dim() == 3, "q must be (batch, heads, head_dim), got ", q.dim(), " dims");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes(),
              "k_cache and v_cache must both be (slots, kv_heads, head_dim)");
  TORCH_CHECK(k_cache.size(2) == q.size(2), "q's head_dim (", q.size(2), ") differs from the cache's (",
              k_cache.size(2), ")");
  TORCH_CHECK(k_cache.size(1) > 0 && q.size(1) % k_cache.size(1) == 0, "heads (", q.size(1),
              ") must be a multiple of kv_heads (", k_cache.size(1), ")");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share one dtype");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == q.size(0) && slots.scalar_type() == at::kLong,
              "slots must be int64 (batch, max_context)");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0) && lengths.scalar_type() == at::kLong,
              "lengths must be int64 (batch,)");
  TORCH_CHECK(starts.sizes() == lengths.sizes() && starts.scalar_type() == at::kLong, "starts must be int64 (batch,)");
  TORCH_CHECK(q.device() == k_cache.device() && q.device() == v_cache.device() && q.device() == slots.device() &&
                  q.device() == lengths.device() && q.device() == starts.device(),
              "q, the caches, slots, lengths and starts must be on one device");
}

}  // namespace alphalora::attention
