// CUDA bindings of router_gates and its backward: checks, allocation, dtype mapping and stream,
// then the launchers of router_gates_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../common/cuda_binding.h"
#include "router_gates_cuda.h"
#include "routing_checks.h"

namespace alphalora::routing {
namespace {

void check_experts_fit(int64_t experts) {
  TORCH_CHECK(experts <= cuda::kRouterGatesMaxExperts, "router_gates on a GPU takes up to ",
              cuda::kRouterGatesMaxExperts, " experts per router, got ", experts,
              "; with that many experts use the layer's grouped kernel (kernel=\"grouped\")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_gates_cuda(const at::Tensor& hidden_in,
                                                                 const at::Tensor& logits_in, int64_t top_k,
                                                                 double scaling) {
  check_router_gates(hidden_in, logits_in, top_k);
  check_experts_fit(logits_in.size(1));
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = unit_column_stride(hidden_in), logits = unit_column_stride(logits_in);
  const int64_t tokens = hidden.size(0), experts = logits.size(1), width = hidden.size(1);
  at::Tensor gated = at::empty({tokens, width}, hidden.options());
  at::Tensor gates = at::empty({tokens, experts}, hidden.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, hidden.options().dtype(at::kLong));
  dispatch_float(hidden.scalar_type(), "router_gates", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(cuda::launch_router_gates<T>(ptr<T>(hidden), hidden.stride(0), ptr<T>(logits), logits.stride(0), tokens,
                                       experts, width / experts, top_k, static_cast<float>(scaling), ptr<T>(gated),
                                       gates.data_ptr<float>(), ids.data_ptr<int64_t>(), stream()),
          "router_gates");
  });
  return {gated, gates, ids};
}

at::Tensor router_gates_backward_cuda(const at::Tensor& grad_gated_in, const at::Tensor& hidden_in,
                                      const at::Tensor& gates_in, const c10::optional<at::Tensor>& grad_logits_in,
                                      double scaling) {
  check_router_gates_backward(grad_gated_in, hidden_in, gates_in, grad_logits_in);
  check_experts_fit(gates_in.size(1));
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor grad_gated = grad_gated_in.contiguous(), hidden = unit_column_stride(hidden_in);
  const at::Tensor gates = gates_in.contiguous();
  const at::Tensor extra =
      grad_logits_in.has_value() ? grad_logits_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t tokens = hidden.size(0), experts = gates.size(1), width = hidden.size(1);
  at::Tensor grad_both = at::empty({tokens, width + experts}, hidden.options());
  dispatch_float(hidden.scalar_type(), "router_gates_backward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(cuda::launch_router_gates_backward<T>(ptr<T>(grad_gated), ptr<T>(hidden), hidden.stride(0),
                                                gates.data_ptr<float>(),
                                                extra.defined() ? extra.data_ptr<float>() : nullptr, tokens, experts,
                                                width / experts, static_cast<float>(scaling), ptr<T>(grad_both),
                                                stream()),
          "router_gates_backward");
  });
  return grad_both;
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) {
  m.impl("router_gates", &router_gates_cuda);
  m.impl("router_gates_backward", &router_gates_backward_cuda);
}

}  // namespace alphalora::routing
