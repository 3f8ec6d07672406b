// The serving engine's expert selection on the CPU: each token keeps the logits of its own
// adapter's router (one block of a GEMM against several routers stacked), then its top-k experts,
// their softmax times its adapter's scaling, and their ids offset to the adapter's place in the
// expert stack: one pass per token where the op-by-op version took about ten tensor ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "routing_checks.h"
#include "top_k_softmax.h"

namespace alphalora::routing {
namespace {

std::tuple<at::Tensor, at::Tensor> select_experts_cpu(const at::Tensor& logits_in, const at::Tensor& member_in,
                                                      const at::Tensor& scale_in, const at::Tensor& base_in,
                                                      int64_t num_experts, int64_t top_k) {
  check_select_experts(logits_in, member_in, scale_in, base_in, num_experts, top_k);
  const at::Tensor logits = unit_column_stride(logits_in);
  const at::Tensor member = member_in.contiguous(), scale = scale_in.contiguous(), base = base_in.contiguous();
  const int64_t tokens = logits.size(0), routers = logits.size(1) / num_experts, row = logits.stride(0);
  const int64_t* members = member.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(members[t] >= 0 && members[t] < routers, "select_experts: token ", t, " names router ", members[t],
                ", outside the ", routers, " routers in logits");
  }
  at::Tensor gates = at::empty({tokens, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "select_experts", [&] {
    const scalar_t* l = logits.data_ptr<scalar_t>();
    const float* scales = scale.data_ptr<float>();
    const int64_t* bases = base.data_ptr<int64_t>();
    float* g = gates.data_ptr<float>();
    int64_t* chosen = ids.data_ptr<int64_t>();
    at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
      std::vector<float> gate(num_experts), scratch(top_k);
      for (int64_t t = begin; t < end; ++t) {
        int64_t* id = chosen + t * top_k;
        top_k_softmax(l + t * row + members[t] * num_experts, num_experts, top_k, gate.data(), id, scratch.data());
        for (int64_t j = 0; j < top_k; ++j) {
          g[t * top_k + j] = scales[t] * gate[id[j]];
          id[j] += bases[t];
        }
      }
    });
  });
  return {gates, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CPU, m) { m.impl("select_experts", &select_experts_cpu); }

}  // namespace alphalora::routing
