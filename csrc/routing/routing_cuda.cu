// Mixture-of-LoRA-experts routing on the GPU: a stable counting sort of (token, slot) pairs by
// expert, a gathered dot-product kernel (shrink, and B^T grad_y), a token-major expand that
// adds every slot of a token in registers (no atomics, deterministic), and a grouped
// outer-product reduction for the weight gradients.
#include "routing_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_accumulate.cuh"

namespace alphalora::routing::cuda {
namespace {

constexpr int kThreads = 256;

using device::acc_t;  // sums in float for float and the 16-bit types, in double for double
using device::from_acc;
using device::to_acc;

// Block-wide exclusive prefix sum of one flag per thread; returns the prefix, sets *total.
__device__ int block_exclusive_scan(int flag, int* total) {
  __shared__ int warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_sums[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kThreads / 32; ++w) {
    if (w < warp) before += warp_sums[w];
    sum += warp_sums[w];
  }
  __syncthreads();
  *total = sum;
  return before + in_warp;
}

__global__ void count_kernel(const int64_t* __restrict__ ids, int64_t pairs, int64_t* __restrict__ counts) {
  const int64_t e = blockIdx.x;
  int64_t local = 0;
  for (int64_t p = threadIdx.x; p < pairs; p += blockDim.x) local += ids[p] == e;
  __shared__ int64_t partial[kThreads];
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[e] = partial[0];
}

__global__ void offsets_kernel(const int64_t* __restrict__ counts, int64_t num_experts, int64_t* __restrict__ offsets) {
  if (threadIdx.x != 0) return;
  offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
}

// One block per expert scans all pairs in chunks; pairs keep their order within an expert. One more block
// (e == num_experts) puts the pairs whose ids are outside [0, num_experts) after every expert's range, so
// that order lists every pair once even then: with validate=False nothing refuses such ids, and without
// this block the end of order kept whatever the allocation held (a pair named twice, another never).
__global__ void place_kernel(const int64_t* __restrict__ ids, int64_t pairs, int64_t num_experts,
                             const int64_t* __restrict__ offsets, int64_t* __restrict__ order) {
  const int64_t e = blockIdx.x;
  const bool outside = e == num_experts;
  int64_t next = offsets[e];
  for (int64_t base = 0; base < pairs; base += blockDim.x) {
    const int64_t p = base + threadIdx.x;
    const int flag = p < pairs && (outside ? ids[p] < 0 || ids[p] >= num_experts : ids[p] == e);
    int total = 0;
    const int rank = block_exclusive_scan(flag, &total);
    if (flag) order[next + rank] = p;
    next += total;
  }
}

// One warp per (sorted pair, output column): lanes stride over the inner dimension.
template <typename T>
__global__ void gathered_dot_kernel(const T* __restrict__ W, int64_t w_se, int64_t w_si, int64_t w_sc,
                                    const T* __restrict__ X, int64_t x_cols, int64_t rows_div,
                                    const int64_t* __restrict__ ids, const int64_t* __restrict__ order,
                                    int64_t pairs, int64_t out_cols, int64_t inner, int64_t num_experts,
                                    T* __restrict__ out) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= pairs * out_cols) return;
  const int64_t p = order[warp / out_cols];  // neighbouring warps share an expert's weights
  // An entry moe_permute never makes names no pair: nothing to read or write (the launcher filled every
  // row with NaN first, so a pair that no valid entry names comes out NaN; no host sync to say so).
  if (p < 0 || p >= pairs) return;
  const int64_t i = warp % out_cols;
  const int64_t e = ids[p];
  if (e < 0 || e >= num_experts) {  // an id moe_permute would refuse: no weights to read (no host sync to say so)
    if (lane == 0) out[p * out_cols + i] = from_acc<T>(acc_t<T>(NAN));
    return;
  }
  const T* w = W + e * w_se + i * w_si;
  const T* x = X + (p / rows_div) * x_cols;
  acc_t<T> acc = 0;
  for (int64_t c = lane; c < inner; c += 32) acc += to_acc(w[c * w_sc]) * to_acc(x[c]);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[p * out_cols + i] = from_acc<T>(acc);
}

template <typename T>
__global__ void token_expand_kernel(const T* __restrict__ W, int64_t w_se, int64_t w_so, int64_t w_si,
                                    const T* __restrict__ H, const T* __restrict__ weights,
                                    const int64_t* __restrict__ ids, int64_t k, int64_t out_cols, int64_t inner,
                                    int64_t num_experts, int64_t col_blocks, T* __restrict__ out) {
  // A flat grid of tokens x column blocks (gridDim.y would cap the tokens at 65535).
  const int64_t t = blockIdx.x / col_blocks;
  const int64_t o = (blockIdx.x % col_blocks) * blockDim.x + threadIdx.x;
  if (o >= out_cols) return;
  acc_t<T> acc = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t p = t * k + j;
    const int64_t e = ids[p];
    if (e < 0 || e >= num_experts) {  // an id moe_permute would refuse: no weights to read
      acc = acc_t<T>(NAN);
      break;
    }
    const T* w = W + e * w_se + o * w_so;
    const T* h = H + p * inner;
    acc_t<T> dot = 0;
    for (int64_t i = 0; i < inner; ++i) dot += to_acc(w[i * w_si]) * to_acc(h[i]);
    acc += (weights ? to_acc(weights[p]) : acc_t<T>(1)) * dot;
  }
  out[t * out_cols + o] = from_acc<T>(acc);
}

template <typename T>
__global__ void grouped_outer_kernel(const T* __restrict__ U, int64_t u_cols, int64_t u_div,
                                     const T* __restrict__ V, int64_t v_cols, int64_t v_div,
                                     const T* __restrict__ weights, const int64_t* __restrict__ ids,
                                     const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                     int64_t pairs, int64_t cell_blocks, T* __restrict__ G) {
  // A flat grid of experts x cell blocks (gridDim.y would cap the experts at 65535).
  const int64_t e = blockIdx.x / cell_blocks;
  const int64_t cell = (blockIdx.x % cell_blocks) * blockDim.x + threadIdx.x;
  if (cell >= u_cols * v_cols) return;
  const int64_t a = cell / v_cols, b = cell % v_cols;
  const int64_t begin = offsets[e], end = offsets[e + 1];
  // A range or an order entry moe_permute never makes: read nothing more, the expert's gradient is NaN. So
  // also for a pair of another expert in e's range (order not made for these ids): its gradient would be
  // silently wrong, where the CPU refuses the call (the same id for every thread: one broadcast load).
  if (begin < 0 || begin > end || end > pairs) {
    G[e * u_cols * v_cols + cell] = from_acc<T>(acc_t<T>(NAN));
    return;
  }
  // Summed in chunks of kChunk pairs, then the chunks: one running float sum over an expert's thousands of
  // pairs loses about pairs x eps of its size; two levels lose about (kChunk + pairs / kChunk) x eps.
  constexpr int64_t kChunk = 256;
  acc_t<T> acc = 0, chunk = 0;
  for (int64_t q = begin; q < end; ++q) {
    const int64_t p = order[q];
    if (p < 0 || p >= pairs || ids[p] != e) {
      acc = acc_t<T>(NAN);
      break;
    }
    const acc_t<T> w = weights ? to_acc(weights[p]) : acc_t<T>(1);
    chunk += w * to_acc(U[(p / u_div) * u_cols + a]) * to_acc(V[(p / v_div) * v_cols + b]);
    if ((q - begin) % kChunk == kChunk - 1) {
      acc += chunk;
      chunk = 0;
    }
  }
  G[e * u_cols * v_cols + cell] = from_acc<T>(acc + chunk);
}

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// gridDim.x takes up to 2^31 - 1 blocks; a larger count cast to unsigned would wrap to a smaller grid that
// silently leaves rows unwritten.
constexpr int64_t kMaxBlocks = 2147483647;

}  // namespace

cudaError_t launch_permute(const int64_t* expert_ids, int64_t pairs, int64_t num_experts, int64_t* counts,
                           int64_t* offsets, int64_t* order, cudaStream_t stream) {
  if (num_experts < 1 || num_experts >= kMaxBlocks) return cudaErrorInvalidConfiguration;
  const unsigned experts = static_cast<unsigned>(num_experts);
  count_kernel<<<experts, kThreads, 0, stream>>>(expert_ids, pairs, counts);
  offsets_kernel<<<1, 32, 0, stream>>>(counts, num_experts, offsets);
  if (pairs > 0) place_kernel<<<experts + 1, kThreads, 0, stream>>>(expert_ids, pairs, num_experts, offsets, order);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gathered_dot(const T* W, int64_t w_se, int64_t w_si, int64_t w_sc, const T* X, int64_t x_cols,
                                int64_t rows_div, const int64_t* expert_ids, const int64_t* order, int64_t pairs,
                                int64_t out_cols, int64_t inner, int64_t num_experts, T* out, cudaStream_t stream) {
  if (pairs == 0 || out_cols == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(pairs * out_cols * 32);
  if (blocks > kMaxBlocks) return cudaErrorInvalidConfiguration;
  // All bits set is NaN in each of the four types: the rows of pairs that no valid order entry names.
  const cudaError_t filled = cudaMemsetAsync(out, 0xFF, sizeof(T) * pairs * out_cols, stream);
  if (filled != cudaSuccess) return filled;
  gathered_dot_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      W, w_se, w_si, w_sc, X, x_cols, rows_div, expert_ids, order, pairs, out_cols, inner, num_experts, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_token_expand(const T* W, int64_t w_se, int64_t w_so, int64_t w_si, const T* H, const T* weights,
                                const int64_t* expert_ids, int64_t tokens, int64_t k, int64_t out_cols, int64_t inner,
                                int64_t num_experts, T* out, cudaStream_t stream) {
  if (tokens == 0 || out_cols == 0) return cudaSuccess;
  const int64_t col_blocks = blocks_for(out_cols);
  if (tokens > kMaxBlocks / col_blocks) return cudaErrorInvalidConfiguration;
  token_expand_kernel<T><<<static_cast<unsigned>(tokens * col_blocks), kThreads, 0, stream>>>(
      W, w_se, w_so, w_si, H, weights, expert_ids, k, out_cols, inner, num_experts, col_blocks, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grouped_outer(const T* U, int64_t u_cols, int64_t u_div, const T* V, int64_t v_cols,
                                 int64_t v_div, const T* weights, const int64_t* expert_ids, const int64_t* order,
                                 const int64_t* offsets, int64_t num_experts, int64_t pairs, T* G,
                                 cudaStream_t stream) {
  if (num_experts == 0 || u_cols * v_cols == 0) return cudaSuccess;
  const int64_t cell_blocks = blocks_for(u_cols * v_cols);
  if (num_experts > kMaxBlocks / cell_blocks) return cudaErrorInvalidConfiguration;
  grouped_outer_kernel<T><<<static_cast<unsigned>(num_experts * cell_blocks), kThreads, 0, stream>>>(
      U, u_cols, u_div, V, v_cols, v_div, weights, expert_ids, order, offsets, pairs, cell_blocks, G);
  return cudaGetLastError();
}

#define ALPHALORA_INSTANTIATE(T)                                                                              \
  template cudaError_t launch_gathered_dot<T>(const T*, int64_t, int64_t, int64_t, const T*, int64_t, int64_t,    \
                                              const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, \
                                              T*, cudaStream_t);                                                  \
  template cudaError_t launch_token_expand<T>(const T*, int64_t, int64_t, int64_t, const T*, const T*,            \
                                              const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, T*,   \
                                              cudaStream_t);                                                      \
  template cudaError_t launch_grouped_outer<T>(const T*, int64_t, int64_t, const T*, int64_t, int64_t, const T*, \
                                               const int64_t*, const int64_t*, const int64_t*, int64_t, int64_t, T*, \
                                               cudaStream_t);

ALPHALORA_INSTANTIATE(double)
ALPHALORA_INSTANTIATE(float)
ALPHALORA_INSTANTIATE(__nv_bfloat16)
ALPHALORA_INSTANTIATE(__half)

}  // namespace alphalora::routing::cuda
