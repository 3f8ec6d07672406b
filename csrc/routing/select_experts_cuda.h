// CUDA launcher of the serving engine's expert selection (select_experts_cpu.cpp has the CPU kernel
// and the op's contract): plain pointers and a stream, no torch header.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alphalora::routing::cuda {

// Per token t (one thread each): in row t of logits (l_row apart), the block of `experts` logits
// starting at member[t] * experts; its top_k largest (equal ones by lower index) into
// ids[t, j] = base[t] + expert and gates[t, j] = scale[t] * their softmax. A member outside
// [0, routers) gives NaN gates and ids base[t] (no read outside the row).
template <typename T>
cudaError_t launch_select_experts(const T* logits, int64_t l_row, const int64_t* member, const float* scale,
                                  const int64_t* base, int64_t tokens, int64_t routers, int64_t experts,
                                  int64_t top_k, float* gates, int64_t* ids, cudaStream_t stream);

}  // namespace alphalora::routing::cuda
