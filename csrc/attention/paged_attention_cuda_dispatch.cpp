// CUDA binding of paged_decode_attention: checks, allocation, dtype mapping and stream, then the launcher
// of paged_attention_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/cuda_binding.h"
#include "attention_checks.h"
#include "paged_attention_cuda.h"

namespace alphalora::attention {
namespace {

at::Tensor paged_decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                       const at::Tensor& slots_in, const at::Tensor& lengths_in,
                                       const at::Tensor& starts_in, double scale) {
  check_paged_decode_inputs(q_in, k_in, v_in, slots_in, lengths_in, starts_in);
  TORCH_CHECK(q_in.size(2) <= cuda::kMaxHeadDim, "paged_decode_attention on CUDA takes head_dim up to ",
              cuda::kMaxHeadDim, ", got ", q_in.size(2));
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor slots = slots_in.contiguous(), lengths = lengths_in.contiguous(), starts = starts_in.contiguous();
  at::Tensor out = at::empty_like(q);
  dispatch_float(q.scalar_type(), "paged_decode_attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    check(cuda::launch_paged_decode_attention<T>(ptr<T>(q), ptr<T>(k), ptr<T>(v), slots.data_ptr<int64_t>(),
                                                 lengths.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), q.size(0),
                                                 q.size(1), k.size(1), q.size(2), slots.size(1), k.size(0), scale,
                                                 ptr<T>(out), stream()),
          "paged_decode_attention kernel");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) { m.impl("paged_decode_attention", &paged_decode_attention_cuda); }

}  // namespace alphalora::attention
