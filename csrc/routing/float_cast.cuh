// Element types to and from float in device code, for the kernels that compute in float whatever
// they read (bfloat16, float16, float32; float64 narrowed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace alphalora::routing::cuda {

__device__ inline float to_float(double v) { return static_cast<float>(v); }
__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline double from_float<double>(float v) { return v; }
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half(v); }

}  // namespace alphalora::routing::cuda
