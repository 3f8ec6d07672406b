// The dense-masked MoE-LoRA router gates on the GPU: one warp per token, the top-k by k rounds of
// a warp-wide argmax, the gates in shared memory, every access to the token's rows coalesced.
// Deterministic: no atomics, each sum in one fixed order.
#include "router_gates_cuda.h"

#include "float_cast.cuh"

#include <climits>

namespace alphalora::routing::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
__global__ void router_gates_kernel(const T* __restrict__ hidden, int64_t h_row, const T* __restrict__ logits,
                                    int64_t l_row, int64_t tokens, int experts, int rank, int top_k, float scaling,
                                    T* __restrict__ gated, float* __restrict__ gates, int64_t* __restrict__ ids) {
  extern __shared__ float shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= tokens) return;  // t is the same for the whole warp
  float* gate = shared + warp * 2 * experts;  // the token's unnormalised, then scaled, gates
  float* taken = gate + experts;               // 1 for the experts chosen so far
  const T* l = logits + t * l_row;
  for (int e = lane; e < experts; e += 32) gate[e] = taken[e] = 0.0f;
  __syncwarp();
  float first = 0.0f, total = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    float best = -INFINITY;
    int best_e = INT_MAX;
    for (int e = lane; e < experts; e += 32) {
      float v = to_float(l[e]);
      if (isnan(v)) v = -INFINITY;  // never out-ranks a number; keeps k choices well defined
      if (taken[e] == 0.0f && (v > best || (v == best && e < best_e))) best = v, best_e = e;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, best, offset);
      const int other_e = __shfl_xor_sync(kFullMask, best_e, offset);
      if (other > best || (other == best && other_e < best_e)) best = other, best_e = other_e;
    }
    if (j == 0) first = best;
    const float weight = expf(best - first);
    total += weight;
    if (lane == 0) {
      taken[best_e] = 1.0f;
      gate[best_e] = weight;
      ids[t * top_k + j] = best_e;
    }
    __syncwarp();
  }
  for (int e = lane; e < experts; e += 32) {
    const float g = taken[e] != 0.0f ? gate[e] / total : 0.0f;  // 0 off the top-k even where total is NaN
    gates[t * experts + e] = g;
    gate[e] = g * scaling;
  }
  __syncwarp();
  const int64_t width = static_cast<int64_t>(experts) * rank;
  const T* h = hidden + t * h_row;
  T* out = gated + t * width;
  for (int64_t c = lane; c < width; c += 32) out[c] = from_float<T>(to_float(h[c]) * gate[c / rank]);
}

template <typename T>
__global__ void router_gates_backward_kernel(const T* __restrict__ grad_gated, const T* __restrict__ hidden,
                                             int64_t h_row, const float* __restrict__ gates,
                                             const float* __restrict__ extra, int64_t tokens, int experts, int rank,
                                             float scaling, T* __restrict__ grad_both) {
  extern __shared__ float shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (t >= tokens) return;
  float* gate = shared + warp * 2 * experts;
  float* grad_gate = gate + experts;  // d loss / d g_e (scaling included)
  const int64_t width = static_cast<int64_t>(experts) * rank;
  const T* dy = grad_gated + t * width;
  const T* h = hidden + t * h_row;
  T* out = grad_both + t * (width + experts);
  float weighted = 0.0f;
  for (int e = lane; e < experts; e += 32) {
    float sum = 0.0f;
    for (int i = 0; i < rank; ++i) sum += to_float(dy[e * rank + i]) * to_float(h[e * rank + i]);
    gate[e] = gates[t * experts + e];
    grad_gate[e] = sum * scaling;
    weighted += gate[e] * grad_gate[e];
  }
  weighted = warp_sum(weighted);
  __syncwarp();
  for (int e = lane; e < experts; e += 32) {
    const float grad = gate[e] * (grad_gate[e] - weighted) + (extra != nullptr ? extra[t * experts + e] : 0.0f);
    out[width + e] = from_float<T>(grad);
  }
  for (int64_t c = lane; c < width; c += 32) out[c] = from_float<T>(to_float(dy[c]) * scaling * gate[c / rank]);
}

unsigned blocks_for_tokens(int64_t tokens) { return static_cast<unsigned>((tokens + kWarps - 1) / kWarps); }
size_t shared_bytes(int64_t experts) { return static_cast<size_t>(kWarps) * 2 * experts * sizeof(float); }

}  // namespace

template <typename T>
cudaError_t launch_router_gates(const T* hidden, int64_t h_row, const T* logits, int64_t l_row, int64_t tokens,
                                int64_t experts, int64_t rank, int64_t top_k, float scaling, T* gated, float* gates,
                                int64_t* ids, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  router_gates_kernel<T><<<blocks_for_tokens(tokens), kThreads, shared_bytes(experts), stream>>>(
      hidden, h_row, logits, l_row, tokens, static_cast<int>(experts), static_cast<int>(rank),
      static_cast<int>(top_k), scaling, gated, gates, ids);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_router_gates_backward(const T* grad_gated, const T* hidden, int64_t h_row, const float* gates,
                                         const float* extra, int64_t tokens, int64_t experts, int64_t rank,
                                         float scaling, T* grad_both, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  router_gates_backward_kernel<T><<<blocks_for_tokens(tokens), kThreads, shared_bytes(experts), stream>>>(
      grad_gated, hidden, h_row, gates, extra, tokens, static_cast<int>(experts), static_cast<int>(rank), scaling,
      grad_both);
  return cudaGetLastError();
}

#define ALPHALORA_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_router_gates<T>(const T*, int64_t, const T*, int64_t, int64_t, int64_t, int64_t,     \
                                              int64_t, float, T*, float*, int64_t*, cudaStream_t);                 \
  template cudaError_t launch_router_gates_backward<T>(const T*, const T*, int64_t, const float*, const float*,    \
                                                       int64_t, int64_t, int64_t, float, T*, cudaStream_t);

ALPHALORA_INSTANTIATE(double)
ALPHALORA_INSTANTIATE(float)
ALPHALORA_INSTANTIATE(__nv_bfloat16)
ALPHALORA_INSTANTIATE(__half)

}  // namespace alphalora::routing::cuda
