// Decode attention straight over the paged KV cache on the GPU, flash-decoding style: one block of four
// warps per (sequence, head); each warp walks every fourth position of the context, a position's score
// one warp-wide dot product (lane i holds elements i, i + 32, ... of q and of the key), and keeps an online
// softmax (running max, running sum, running weighted sum of the values in registers); the four warps'
// partial results are then combined through shared memory. No gathered copy of the context, no mask, one
// launch per layer. Sums run in float for float and the 16-bit types (rounded once on store), in double
// for double.
#include "paged_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_accumulate.cuh"

namespace alphalora::attention::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPerLane = static_cast<int>(kMaxHeadDim / 32);
constexpr unsigned kFullMask = 0xffffffffu;

using device::acc_t;  // sums in float for float and the 16-bit types, in double for double
using device::from_acc;
using device::to_acc;

__device__ inline float exp_of(float v) { return expf(v); }
__device__ inline double exp_of(double v) { return exp(v); }

template <typename A>
__device__ inline A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Shared memory: per warp its running max, its running sum and its weighted sum of the values [dim], in
// the accumulation type (declared as double, the widest, so that every instantiation shares one array).
template <typename T>
__global__ void paged_decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                                              const T* __restrict__ v_cache, const int64_t* __restrict__ slots,
                                              const int64_t* __restrict__ lengths,
                                              const int64_t* __restrict__ starts, int64_t heads, int64_t kv_heads,
                                              int dim, int64_t width, int64_t cache_slots, acc_t<T> scale,
                                              T* __restrict__ out) {
  using A = acc_t<T>;
  extern __shared__ double shared_words[];
  A* partials = reinterpret_cast<A*>(shared_words);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = blockIdx.x, b = row / heads, h = row % heads, g = h / (heads / kv_heads);
  const int64_t n = lengths[b], first = starts[b];
  bool broken = !(n >= 0 && n <= width && first >= 0 && first <= n);

  A query[kPerLane], acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    query[i] = d < dim ? to_acc(q[row * dim + d]) : A(0);
    acc[i] = 0;
  }
  A best = -INFINITY, total = 0;
  for (int64_t j = first + warp; !broken && j < n; j += kWarps) {
    const int64_t slot = slots[b * width + j];  // the same for the whole warp
    if (slot < 0 || slot >= cache_slots) {
      broken = true;
      break;
    }
    const T* key = k_cache + (slot * kv_heads + g) * dim;
    const T* value = v_cache + (slot * kv_heads + g) * dim;
    A dot = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) dot += query[i] * to_acc(key[d]);
    }
    const A score = warp_sum(dot) * scale;
    if (score > best) {  // a new running max: rescale what was summed against the old one
      const A factor = exp_of(best - score);
      total *= factor;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] *= factor;
      best = score;
    }
    const A weight = exp_of(score - best);
    total += weight;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < dim) acc[i] += weight * to_acc(value[d]);
    }
  }

  A* mine = partials + warp * (dim + 2);
  if (lane == 0) {
    mine[0] = best;
    mine[1] = broken ? A(NAN) : total;
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < dim) mine[2 + d] = acc[i];
  }
  __syncthreads();
  // The block's max over the warps' maxima; each warp's sums rescaled to it (a warp that saw no position
  // adds nothing), then normalised as the CPU kernel does: no context (a sum of 0) gives zeros.
  A top = -INFINITY;
  for (int w = 0; w < kWarps; ++w) top = partials[w * (dim + 2)] > top ? partials[w * (dim + 2)] : top;
  A factors[kWarps], sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    const A warp_best = partials[w * (dim + 2)];
    factors[w] = warp_best == A(-INFINITY) ? A(0) : exp_of(warp_best - top);
    sum += partials[w * (dim + 2) + 1] * factors[w];
  }
  const A inverse = sum > 0 ? A(1) / sum : (sum == sum ? A(0) : A(NAN));
  for (int d = threadIdx.x; d < dim; d += kThreads) {
    A value = 0;
    for (int w = 0; w < kWarps; ++w) value += partials[w * (dim + 2) + 2 + d] * factors[w];
    out[row * dim + d] = from_acc<T>(value * inverse);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_paged_decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots,
                                          const int64_t* lengths, const int64_t* starts, int64_t batch, int64_t heads,
                                          int64_t kv_heads, int64_t dim, int64_t width, int64_t cache_slots,
                                          double scale, T* out, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || dim == 0) return cudaSuccess;
  const size_t shared = static_cast<size_t>(kWarps) * static_cast<size_t>(dim + 2) * sizeof(acc_t<T>);
  paged_decode_attention_kernel<T><<<static_cast<unsigned>(batch * heads), kThreads, shared, stream>>>(
      q, k_cache, v_cache, slots, lengths, starts, heads, kv_heads, static_cast<int>(dim), width, cache_slots,
      static_cast<acc_t<T>>(scale), out);
  return cudaGetLastError();
}

#define ALPHALORA_INSTANTIATE(T)                                                                                  \
  template cudaError_t launch_paged_decode_attention<T>(const T*, const T*, const T*, const int64_t*,             \
                                                        const int64_t*, const int64_t*, int64_t, int64_t, int64_t, \
                                                        int64_t, int64_t, int64_t, double, T*, cudaStream_t);

ALPHALORA_INSTANTIATE(double)
ALPHALORA_INSTANTIATE(float)
ALPHALORA_INSTANTIATE(__nv_bfloat16)
ALPHALORA_INSTANTIATE(__half)

}  // namespace alphalora::attention::cuda
