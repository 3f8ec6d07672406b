// CUDA launchers for the mixture-of-LoRA-experts routing ops: plain pointers and a stream, so
// the .cu file includes no torch header (fast nvcc, standalone CMake build).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alphalora::routing::cuda {

// Stable counting sort of pairs by expert id: counts/offsets (num_experts + 1) and order (pairs). Pairs whose
// ids are outside [0, num_experts) are counted in no expert (offsets[num_experts] < pairs tells them) and
// listed after every expert's range, so order is a permutation of the pairs whatever the ids.
cudaError_t launch_permute(const int64_t* expert_ids, int64_t pairs, int64_t num_experts, int64_t* counts,
                           int64_t* offsets, int64_t* order, cudaStream_t stream);

// out[p, i] = sum_c W[e_p, i, c] * X[row(p), c], row(p) = p / rows_div (tokens: k; pairs: 1).
// W is addressed as W + e * w_se + i * w_si + c * w_sc. Accumulates in float (double for double).
// Pairs are visited in `order`. A pair whose id is outside [0, num_experts) reads no weights: its row is
// NaN. An order entry outside [0, pairs) is skipped, and a pair no entry names keeps the NaN that every
// row of `out` is filled with first (no host sync to check order).
template <typename T>
cudaError_t launch_gathered_dot(const T* W, int64_t w_se, int64_t w_si, int64_t w_sc, const T* X,
                                int64_t x_cols, int64_t rows_div, const int64_t* expert_ids,
                                const int64_t* order, int64_t pairs, int64_t out_cols, int64_t inner,
                                int64_t num_experts, T* out, cudaStream_t stream);

// out[t, o] = sum_{j<k} w[p] * sum_i W[e_p, o, i] * H[p, i], p = t * k + j (w may be null: 1).
// A token with an id outside [0, num_experts) reads no weights for it: its row is NaN.
template <typename T>
cudaError_t launch_token_expand(const T* W, int64_t w_se, int64_t w_so, int64_t w_si, const T* H,
                                const T* weights, const int64_t* expert_ids, int64_t tokens, int64_t k,
                                int64_t out_cols, int64_t inner, int64_t num_experts, T* out,
                                cudaStream_t stream);

// G[e, a, b] = sum over expert e's pairs p of w[p] * U[urow(p), a] * V[vrow(p), b] (w may be null).
// urow(p) = p / u_div, vrow(p) = p / v_div. Expert e's pairs are order[offsets[e]:offsets[e + 1]]; a range
// outside [0, pairs) or decreasing, an entry outside [0, pairs), or a pair whose expert_ids entry is not e
// reads no further: G[e] is NaN. (A pair listed twice in its own expert's range counts twice; order then
// misses another pair, whose row the order-reading kernels leave NaN, so the step is NaN either way.)
template <typename T>
cudaError_t launch_grouped_outer(const T* U, int64_t u_cols, int64_t u_div, const T* V, int64_t v_cols,
                                 int64_t v_div, const T* weights, const int64_t* expert_ids, const int64_t* order,
                                 const int64_t* offsets, int64_t num_experts, int64_t pairs, T* G,
                                 cudaStream_t stream);

// Each launcher returns cudaErrorInvalidConfiguration, launching nothing, where its grid would need more
// than 2^31 - 1 blocks.

}  // namespace alphalora::routing::cuda
