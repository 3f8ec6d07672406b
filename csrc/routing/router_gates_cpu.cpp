// CPU kernels of the mixture-of-LoRA-experts router gates (the dense-masked path's routing math in
// one pass per token instead of a dozen small tensor ops each way).
//
// Forward: the top-k of each token's router logits, their softmax (= the renormalised top-k of the
// softmax over all experts), dense gates (T, E) with zeros off the top-k, and every expert's
// down-projection scaled by its gate. Backward: the gated input's gradient and the logits' gradient
// through g = softmax(top-k logits), written into one (T, E * r + E) buffer, [A; router]'s layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "routing_checks.h"
#include "top_k_softmax.h"

namespace alphalora::routing {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_gates_cpu(const at::Tensor& hidden_in,
                                                                const at::Tensor& logits_in, int64_t top_k,
                                                                double scaling) {
  check_router_gates(hidden_in, logits_in, top_k);
  const at::Tensor hidden = unit_column_stride(hidden_in), logits = unit_column_stride(logits_in);
  const int64_t tokens = hidden.size(0), experts = logits.size(1), width = hidden.size(1);
  const int64_t rank = width / experts, h_row = hidden.stride(0), l_row = logits.stride(0);
  at::Tensor gated = at::empty({tokens, width}, hidden.options());
  at::Tensor gates = at::empty({tokens, experts}, hidden.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, hidden.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "router_gates", [&] {
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    const scalar_t* l = logits.data_ptr<scalar_t>();
    scalar_t* out = gated.data_ptr<scalar_t>();
    float* g = gates.data_ptr<float>();
    int64_t* chosen = ids.data_ptr<int64_t>();
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(top_k);
      for (int64_t t = begin; t < end; ++t) {
        float* gate = g + t * experts;
        top_k_softmax(l + t * l_row, experts, top_k, gate, chosen + t * top_k, scratch.data());
        for (int64_t e = 0; e < experts; ++e) {
          const float scale = static_cast<float>(scaling) * gate[e];
          const scalar_t* in = h + t * h_row + e * rank;
          scalar_t* o = out + t * width + e * rank;
          for (int64_t i = 0; i < rank; ++i) o[i] = static_cast<scalar_t>(static_cast<float>(in[i]) * scale);
        }
      }
    });
  });
  return {gated, gates, ids};
}

at::Tensor router_gates_backward_cpu(const at::Tensor& grad_gated_in, const at::Tensor& hidden_in,
                                     const at::Tensor& gates_in, const c10::optional<at::Tensor>& grad_logits_in,
                                     double scaling) {
  check_router_gates_backward(grad_gated_in, hidden_in, gates_in, grad_logits_in);
  const at::Tensor grad_gated = grad_gated_in.contiguous(), hidden = unit_column_stride(hidden_in);
  const at::Tensor gates = gates_in.contiguous();
  const int64_t h_row = hidden.stride(0);
  const at::Tensor grad_logits =
      grad_logits_in.has_value() ? grad_logits_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t tokens = hidden.size(0), experts = gates.size(1), width = hidden.size(1);
  const int64_t rank = width / experts;
  at::Tensor grad_both = at::empty({tokens, width + experts}, hidden.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "router_gates_backward", [&] {
    const scalar_t* dy = grad_gated.data_ptr<scalar_t>();
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    const float* g = gates.data_ptr<float>();
    const float* extra = grad_logits.defined() ? grad_logits.data_ptr<float>() : nullptr;
    scalar_t* out = grad_both.data_ptr<scalar_t>();
    const float scale = static_cast<float>(scaling);
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> dgate(experts);
      for (int64_t t = begin; t < end; ++t) {
        const float* gate = g + t * experts;
        scalar_t* row = out + t * (width + experts);
        float weighted = 0.0f;  // sum_e g_e dL/dg_e
        for (int64_t e = 0; e < experts; ++e) {
          float sum = 0.0f;
          for (int64_t i = 0; i < rank; ++i) {
            const float d = static_cast<float>(dy[t * width + e * rank + i]);
            sum += d * static_cast<float>(h[t * h_row + e * rank + i]);
            row[e * rank + i] = static_cast<scalar_t>(d * scale * gate[e]);
          }
          dgate[e] = sum * scale;
          weighted += gate[e] * dgate[e];
        }
        for (int64_t e = 0; e < experts; ++e) {
          const float grad = gate[e] * (dgate[e] - weighted) + (extra ? extra[t * experts + e] : 0.0f);
          row[width + e] = static_cast<scalar_t>(grad);
        }
      }
    });
  });
  return grad_both;
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CPU, m) {
  m.impl("router_gates", &router_gates_cpu);
  m.impl("router_gates_backward", &router_gates_backward_cpu);
}

}  // namespace alphalora::routing
