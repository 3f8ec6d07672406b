// CUDA binding of select_experts: checks, allocation, dtype mapping and stream, then the launcher
// of select_experts_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../common/cuda_binding.h"
#include "routing_checks.h"
#include "select_experts_cuda.h"

namespace alphalora::routing {
namespace {

std::tuple<at::Tensor, at::Tensor> select_experts_cuda(const at::Tensor& logits_in, const at::Tensor& member_in,
                                                       const at::Tensor& scale_in, const at::Tensor& base_in,
                                                       int64_t num_experts, int64_t top_k) {
  check_select_experts(logits_in, member_in, scale_in, base_in, num_experts, top_k);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = unit_column_stride(logits_in);
  const at::Tensor member = member_in.contiguous(), scale = scale_in.contiguous(), base = base_in.contiguous();
  const int64_t tokens = logits.size(0);
  at::Tensor gates = at::empty({tokens, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, logits.options().dtype(at::kLong));
  dispatch_float(logits.scalar_type(), "select_experts", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(cuda::launch_select_experts<T>(ptr<T>(logits), logits.stride(0), member.data_ptr<int64_t>(),
                                         scale.data_ptr<float>(), base.data_ptr<int64_t>(), tokens,
                                         logits.size(1) / num_experts, num_experts, top_k, gates.data_ptr<float>(),
                                         ids.data_ptr<int64_t>(), stream()),
          "select_experts");
  });
  return {gates, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) { m.impl("select_experts", &select_experts_cuda); }

}  // namespace alphalora::routing
