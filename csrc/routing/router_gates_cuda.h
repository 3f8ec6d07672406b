// CUDA launchers of the dense-masked MoE-LoRA router gates (router_gates_cpu.cpp has the CPU
// kernels and the op's contract): plain pointers and a stream, no torch header.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alphalora::routing::cuda {

// The most experts one token's gates can have here: each warp keeps two floats per expert in
// shared memory (8 warps a block).
constexpr int64_t kRouterGatesMaxExperts = 512;

// Per token t (one warp each): the top_k largest logits[t * l_row + e] (equal ones by lower e),
// their softmax in gates[t, e] (zero elsewhere), ids[t, j], and
// gated[t, c] = hidden[t * h_row + c] * scaling * gates[t, c / rank] for c < experts * rank.
template <typename T>
cudaError_t launch_router_gates(const T* hidden, int64_t h_row, const T* logits, int64_t l_row, int64_t tokens,
                                int64_t experts, int64_t rank, int64_t top_k, float scaling, T* gated, float* gates,
                                int64_t* ids, cudaStream_t stream);

// Per token t, into grad_both[t] (experts * rank + experts columns): the gated input's gradient
// grad_gated * scaling * gate, then each logit's gradient g_e (d_e - sum_j g_j d_j) (+ extra[t, e]
// when extra is not null), d_e = scaling * sum_i grad_gated[t, e, i] hidden[t, e, i].
template <typename T>
cudaError_t launch_router_gates_backward(const T* grad_gated, const T* hidden, int64_t h_row, const float* gates,
                                         const float* extra, int64_t tokens, int64_t experts, int64_t rank,
                                         float scaling, T* grad_both, cudaStream_t stream);

}  // namespace alphalora::routing::cuda
