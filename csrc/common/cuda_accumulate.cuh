// The CUDA kernels' accumulation type and conversions to and from it: sums run in float for float and the
// 16-bit types (rounded once on store), in double for double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace alphalora::device {

template <typename T> struct Accumulator { using type = float; };
template <> struct Accumulator<double> { using type = double; };
template <typename T> using acc_t = typename Accumulator<T>::type;

__device__ inline double to_acc(double v) { return v; }
__device__ inline float to_acc(float v) { return v; }
__device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_acc(__half v) { return __half2float(v); }
template <typename T> __device__ inline T from_acc(acc_t<T> v);
template <> __device__ inline double from_acc<double>(double v) { return v; }
template <> __device__ inline float from_acc<float>(float v) { return v; }
template <> __device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ inline __half from_acc<__half>(float v) { return __float2half(v); }

}  // namespace alphalora::device
