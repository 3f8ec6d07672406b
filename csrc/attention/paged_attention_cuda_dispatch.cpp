// CUDA binding of paged_decode_attention: checks, allocation, dtype mapping and stream, then the launcher
// of paged_attention_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "paged_attention_cuda.h"

namespace alphalora::attention {
namespace {

template <typename T>
cudaError_t launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                   const at::Tensor& lengths, const at::Tensor& starts, double scale, at::Tensor& out) {
  const auto as = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };
  return cuda::launch_paged_decode_attention<T>(
      as(q), as(k), as(v), slots.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
      q.size(0), q.size(1), k.size(1), q.size(2), slots.size(1), k.size(0), scale,
      reinterpret_cast<T*>(out.data_ptr()), c10::cuda::getCurrentCUDAStream());
}

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
  cudaError_t status;
  switch (q.scalar_type()) {
    case at::kDouble: status = launch<double>(q, k, v, slots, lengths, starts, scale, out); break;
    case at::kFloat: status = launch<float>(q, k, v, slots, lengths, starts, scale, out); break;
    case at::kBFloat16: status = launch<__nv_bfloat16>(q, k, v, slots, lengths, starts, scale, out); break;
    case at::kHalf: status = launch<__half>(q, k, v, slots, lengths, starts, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention takes float64, float32, bfloat16 or float16, got ",
                         q.scalar_type());
  }
  TORCH_CHECK(status == cudaSuccess, "paged_decode_attention kernel failed: ", cudaGetErrorString(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) { m.impl("paged_decode_attention", &paged_decode_attention_cuda); }

}  // namespace alphalora::attention
