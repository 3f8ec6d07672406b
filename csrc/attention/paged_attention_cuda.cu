// Decode attention straight over the paged KV cache on the GPU, flash-decoding style: one block of four warps
// per (sequence, head). Each warp walks the context a tile of positions at a time (every fourth tile): the
// tile's slots come in one load (the next tile's while this one is scored), then the tile's keys and values all
// at once (lane i holds elements i, i + 32, ... of q, of each key and of each value), so that a warp has a
// tile's loads in flight rather than one position's; each position's score is a warp-wide dot product, and the
// warp keeps an online softmax (running max, running sum, running weighted sum of the values in registers),
// rescaled once a tile. The four warps' partial results are then combined through shared memory. The lane's
// share of the head (kPerLane elements: 1, 2, 4 or 8, by head_dim) is a template parameter, and a tile holds 32
// / kPerLane positions (16 at most), so that a tile's keys take at most 32 registers a lane at any head_dim. No
// gathered copy of the context, no mask, one launch per layer. Sums run in float for float and the 16-bit types
// (rounded once on store), in double for double.
#include "paged_attention_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../common/cuda_accumulate.cuh"

namespace alphalora::attention::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
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
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    paged_decode_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache, const int64_t* __restrict__ slots,
                                  const int64_t* __restrict__ lengths, const int64_t* __restrict__ starts,
                                  int64_t heads, int64_t kv_heads, int dim, int64_t width, int64_t cache_slots,
                                  acc_t<T> scale, T* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int kTile = kPerLane > 1 ? 32 / kPerLane : 16;  // positions a warp has in flight
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
  // Lane p < kTile holds the slot of position tile + p: a tile's slots come in one load, the next tile's
  // while this one's scores are computed.
  const auto slot_of = [&](int64_t tile) {
    return lane < kTile && tile + lane < n ? slots[b * width + tile + lane] : int64_t(0);
  };
  const int64_t stride = kWarps * kTile;
  int64_t my_slot = broken ? 0 : slot_of(first + warp * kTile);
  for (int64_t tile = first + warp * kTile; !broken && tile < n; tile += stride) {
    const int in_tile = static_cast<int>(n - tile < kTile ? n - tile : kTile);
    if (__any_sync(kFullMask, lane < in_tile && (my_slot < 0 || my_slot >= cache_slots))) {
      broken = true;
      break;
    }
    // Where position tile + p's key and value start (from lane p's slot; the shuffle is cheaper than
    // holding the tile's offsets in registers).
    const auto offset = [&](int p) { return (__shfl_sync(kFullMask, my_slot, p) * kv_heads + g) * dim; };

    // Every load of the tile, keys and values, issued before the first is used.
    const T zero = from_acc<T>(A(0));
    T key[kTile][kPerLane], value[kTile][kPerLane];
#pragma unroll
    for (int p = 0; p < kTile; ++p) {
      const int64_t start = offset(p);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        const bool here = p < in_tile && d < dim;
        key[p][i] = here ? k_cache[start + d] : zero;
        value[p][i] = here ? v_cache[start + d] : zero;
      }
    }
    my_slot = slot_of(tile + stride);

    A score[kTile];
    A tile_best = -INFINITY;
#pragma unroll
    for (int p = 0; p < kTile; ++p) {
      A dot = 0;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) dot += query[i] * to_acc(key[p][i]);
      score[p] = warp_sum(dot) * scale;
      if (p < in_tile && score[p] > tile_best) tile_best = score[p];
    }
    if (tile_best > best) {  // a new running max: rescale what was summed against the old one
      const A factor = exp_of(best - tile_best);
      total *= factor;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] *= factor;
      best = tile_best;
    }
#pragma unroll
    for (int p = 0; p < kTile; ++p) {
      const A weight = p < in_tile ? exp_of(score[p] - best) : A(0);
      total += weight;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += weight * to_acc(value[p][i]);
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

template <typename T, int kPerLane>
cudaError_t launch_with(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, const int64_t* lengths,
                        const int64_t* starts, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                        int64_t width, int64_t cache_slots, double scale, T* out, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(kWarps) * static_cast<size_t>(dim + 2) * sizeof(acc_t<T>);
  paged_decode_attention_kernel<T, kPerLane><<<static_cast<unsigned>(batch * heads), kThreads, shared, stream>>>(
      q, k_cache, v_cache, slots, lengths, starts, heads, kv_heads, static_cast<int>(dim), width, cache_slots,
      static_cast<acc_t<T>>(scale), out);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_paged_decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots,
                                          const int64_t* lengths, const int64_t* starts, int64_t batch, int64_t heads,
                                          int64_t kv_heads, int64_t dim, int64_t width, int64_t cache_slots,
                                          double scale, T* out, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || dim == 0) return cudaSuccess;
  // The lane's share of the head: the fewest registers that hold it.
  const auto launch = [&](auto per_lane) {
    return launch_with<T, decltype(per_lane)::value>(q, k_cache, v_cache, slots, lengths, starts, batch, heads,
                                                     kv_heads, dim, width, cache_slots, scale, out, stream);
  };
  if (dim <= 32) return launch(std::integral_constant<int, 1>{});
  if (dim <= 64) return launch(std::integral_constant<int, 2>{});
  if (dim <= 128) return launch(std::integral_constant<int, 4>{});
  return launch(std::integral_constant<int, 8>{});
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
