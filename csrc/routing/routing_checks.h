// Argument checks shared by the CPU and CUDA bindings of the routing ops: shapes, dtypes and
// devices are checked before any kernel reads a pointer.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace alphalora::routing {

inline void check_pairs(const at::Tensor& expert_ids, const at::Tensor& order, const at::Tensor& offsets) {
  TORCH_CHECK(expert_ids.dim() == 1 && expert_ids.scalar_type() == at::kLong,
              "expert_ids must be a flat int64 tensor (one entry per token-slot pair)");
  TORCH_CHECK(order.sizes() == expert_ids.sizes() && order.scalar_type() == at::kLong,
              "order must be int64 with one entry per pair (from moe_permute)");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.size(0) >= 1,
              "offsets must be int64 (num_experts + 1) (from moe_permute)");
}

inline int64_t top_k_of(int64_t pairs, int64_t tokens) {
  TORCH_CHECK(tokens > 0 ? pairs % tokens == 0 : pairs == 0, "the number of pairs (", pairs,
              ") must be a multiple of the number of tokens (", tokens, ")");
  return tokens > 0 ? pairs / tokens : 1;
}

// Every tensor on the first one's device, and the floating ones in the first one's dtype.
inline void check_alike(std::initializer_list<const at::Tensor*> tensors, const char* op) {
  const at::Tensor& first = **tensors.begin();
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device() == first.device(), op, ": every tensor must be on ", first.device(), ", got one on ",
                t->device());
    TORCH_CHECK(!t->is_floating_point() || t->scalar_type() == first.scalar_type(), op,
                ": the floating-point inputs must share one dtype (", first.scalar_type(), "), got ",
                t->scalar_type());
  }
}

inline void check_experts(const at::Tensor& weights, const at::Tensor& offsets, const char* op) {
  TORCH_CHECK(offsets.size(0) == weights.size(0) + 1, op, ": offsets has ", offsets.size(0),
              " entries for ", weights.size(0), " experts; it must have num_experts + 1 (from moe_permute)");
}

inline void check_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& ids, const at::Tensor& order,
                         const at::Tensor& offsets) {
  check_pairs(ids, order, offsets);
  TORCH_CHECK(x.dim() == 2 && A.dim() == 3 && A.size(2) == x.size(1), "x must be (T, in) and A (E, r, in)");
  check_experts(A, offsets, "grouped_lora_shrink");
  check_alike({&x, &A, &ids, &order, &offsets}, "grouped_lora_shrink");
}

inline void check_expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& gates, const at::Tensor& ids,
                         const at::Tensor& order, const at::Tensor& offsets) {
  check_pairs(ids, order, offsets);
  TORCH_CHECK(h.dim() == 2 && B.dim() == 3 && B.size(2) == h.size(1), "h must be (P, r) and B (E, out, r)");
  TORCH_CHECK(h.size(0) == ids.size(0), "h must have one row per pair");
  TORCH_CHECK(gates.sizes() == ids.sizes(), "gates must have one entry per pair");
  check_experts(B, offsets, "grouped_lora_expand");
  check_alike({&h, &B, &gates, &ids, &order, &offsets}, "grouped_lora_expand");
}

inline void check_shrink_backward(const at::Tensor& grad_h, const at::Tensor& x, const at::Tensor& A,
                                  const at::Tensor& ids, const at::Tensor& order, const at::Tensor& offsets) {
  check_shrink(x, A, ids, order, offsets);
  TORCH_CHECK(grad_h.dim() == 2 && grad_h.size(0) == ids.size(0) && grad_h.size(1) == A.size(1),
              "grad_h must be (P, r)");
  check_alike({&x, &grad_h}, "grouped_lora_shrink_backward");
}

inline void check_expand_backward(const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& B,
                                  const at::Tensor& gates, const at::Tensor& ids, const at::Tensor& order,
                                  const at::Tensor& offsets) {
  check_expand(h, B, gates, ids, order, offsets);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(1) == B.size(1), "grad_y must be (T, out)");
  check_alike({&h, &grad_y}, "grouped_lora_expand_backward");
}

// The router gate kernels read rows with any stride (hidden and logits are column slices of one
// GEMM's output) but columns contiguous.
inline at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// router_gates: hidden (T, E * r) and logits (T, E) of one dtype, 1 <= top_k <= E.
inline void check_router_gates(const at::Tensor& hidden, const at::Tensor& logits, int64_t top_k) {
  TORCH_CHECK(hidden.dim() == 2 && logits.dim() == 2 && hidden.size(0) == logits.size(0),
              "router_gates: hidden must be (T, E * r) and logits (T, E) for the same T tokens");
  const int64_t experts = logits.size(1);
  TORCH_CHECK(experts >= 1 && hidden.size(1) % experts == 0, "router_gates: hidden has ", hidden.size(1),
              " columns, not a multiple of the ", experts, " experts' ranks");
  TORCH_CHECK(top_k >= 1 && top_k <= experts, "router_gates: top_k must be in [1, ", experts, "], got ", top_k);
  check_alike({&hidden, &logits}, "router_gates");
}

// router_gates_backward: grad_gated and hidden (T, E * r), gates (T, E) float32, grad_logits (T, E) or none.
inline void check_router_gates_backward(const at::Tensor& grad_gated, const at::Tensor& hidden,
                                        const at::Tensor& gates, const c10::optional<at::Tensor>& grad_logits) {
  TORCH_CHECK(gates.dim() == 2 && gates.scalar_type() == at::kFloat && gates.size(1) >= 1,
              "router_gates_backward: gates must be the (T, E) float32 gates from router_gates");
  TORCH_CHECK(grad_gated.dim() == 2 && grad_gated.sizes() == hidden.sizes() && hidden.size(0) == gates.size(0) &&
                  hidden.size(1) % gates.size(1) == 0,
              "router_gates_backward: grad_gated and hidden must both be (T, E * r) for gates (T, E)");
  check_alike({&grad_gated, &hidden}, "router_gates_backward");
  TORCH_CHECK(gates.device() == hidden.device(), "router_gates_backward: gates must be on ", hidden.device());
  if (grad_logits.has_value()) {
    TORCH_CHECK(grad_logits->sizes() == gates.sizes() && grad_logits->device() == hidden.device(),
                "router_gates_backward: grad_logits must be (T, E) like gates, on ", hidden.device());
  }
}

// select_experts: logits (T, M * E) floating, member and base (T) int64, scale (T) float32, 1 <= top_k <= E.
inline void check_select_experts(const at::Tensor& logits, const at::Tensor& member, const at::Tensor& scale,
                                 const at::Tensor& base, int64_t num_experts, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_floating_point(),
              "select_experts: logits must be (T, M * E) floating point (M routers of E experts side by side)");
  TORCH_CHECK(num_experts >= 1 && logits.size(1) % num_experts == 0, "select_experts: logits has ", logits.size(1),
              " columns, not a multiple of num_experts = ", num_experts);
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "select_experts: top_k must be in [1, ", num_experts, "], got ",
              top_k);
  const int64_t tokens = logits.size(0);
  for (const at::Tensor* t : {&member, &base}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == tokens && t->scalar_type() == at::kLong,
                "select_experts: member and base must be int64 with one entry per token (", tokens, ")");
  }
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == tokens && scale.scalar_type() == at::kFloat,
              "select_experts: scale must be float32 with one entry per token (", tokens, ")");
  check_alike({&logits, &member, &base}, "select_experts");
  TORCH_CHECK(scale.device() == logits.device(), "select_experts: scale must be on ", logits.device());
}

}  // namespace alphalora::routing
