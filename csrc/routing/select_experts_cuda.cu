// The serving engine's expert selection on the GPU: one thread per token, k passes over its own
// router's logits (a decode step has few tokens and each router few experts), no shared memory,
// no atomics. Chooses exactly as the CPU kernel does (top_k_softmax.h).
#include "select_experts_cuda.h"

#include "float_cast.cuh"

namespace alphalora::routing::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void select_experts_kernel(const T* __restrict__ logits, int64_t l_row, const int64_t* __restrict__ member,
                                      const float* __restrict__ scale, const int64_t* __restrict__ base,
                                      int64_t tokens, int64_t routers, int experts, int top_k,
                                      float* __restrict__ gates, int64_t* __restrict__ ids) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const int64_t router = member[t], first_id = base[t];
  float* g = gates + t * top_k;
  int64_t* id = ids + t * top_k;
  if (router < 0 || router >= routers) {
    for (int j = 0; j < top_k; ++j) g[j] = NAN, id[j] = first_id;
    return;
  }
  const T* l = logits + t * l_row + router * experts;
  // Pass j takes the largest logit not yet taken; ids[] of this token (written below) mark the taken.
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    float best_value = 0.0f;
    for (int e = 0; e < experts; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= id[i] == first_id + e;
      float value = to_float(l[e]);
      if (isnan(value)) value = -INFINITY;  // never out-ranks a number; keeps k choices well defined
      if (!taken && (best < 0 || value > best_value)) best = e, best_value = value;
    }
    id[j] = first_id + best;
    g[j] = best_value;  // the logit for now; its gate below
  }
  const float top = g[0];
  float total = 0.0f;
  for (int j = 0; j < top_k; ++j) total += expf(g[j] - top);
  for (int j = 0; j < top_k; ++j) g[j] = scale[t] * (expf(g[j] - top) / total);
}

}  // namespace

template <typename T>
cudaError_t launch_select_experts(const T* logits, int64_t l_row, const int64_t* member, const float* scale,
                                  const int64_t* base, int64_t tokens, int64_t routers, int64_t experts,
                                  int64_t top_k, float* gates, int64_t* ids, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((tokens + kThreads - 1) / kThreads);
  select_experts_kernel<T><<<blocks, kThreads, 0, stream>>>(logits, l_row, member, scale, base, tokens, routers,
                                                            static_cast<int>(experts), static_cast<int>(top_k),
                                                            gates, ids);
  return cudaGetLastError();
}

#define ALPHALORA_INSTANTIATE(T)                                                                                 \
  template cudaError_t launch_select_experts<T>(const T*, int64_t, const int64_t*, const float*, const int64_t*, \
                                                int64_t, int64_t, int64_t, int64_t, float*, int64_t*, cudaStream_t);

ALPHALORA_INSTANTIATE(double)
ALPHALORA_INSTANTIATE(float)
ALPHALORA_INSTANTIATE(__nv_bfloat16)
ALPHALORA_INSTANTIATE(__half)

}  // namespace alphalora::routing::cuda
