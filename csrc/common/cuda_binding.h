// Helpers shared by the CUDA bindings of the ops (*_cuda_dispatch.cpp; compiled only in CUDA builds).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace alphalora {

inline void check(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Calls fn(T*) with the CUDA element type matching the tensor's dtype; `op` names the op in the error.
template <typename Fn>
void dispatch_float(at::ScalarType type, const char* op, Fn fn) {
  switch (type) {
    case at::kDouble: fn(static_cast<double*>(nullptr)); break;
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    case at::kHalf: fn(static_cast<__half*>(nullptr)); break;
    default: TORCH_CHECK(false, op, " takes float64, float32, bfloat16 or float16, got ", type);
  }
}

template <typename T>
T* ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

}  // namespace alphalora
