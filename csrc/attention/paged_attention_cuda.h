// CUDA launcher of decode attention over the paged KV cache (paged_attention_cpu.cpp has the CPU kernel
// and the op's contract): plain pointers and a stream, no torch header.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alphalora::attention::cuda {

// The largest head_dim the kernel holds in registers (eight elements a lane).
constexpr int64_t kMaxHeadDim = 256;

// out[b, h] = softmax over j in [starts[b], lengths[b]) of scale * q[b, h] . k[slots[b, j], h / group],
// weighted sum of v[slots[b, j], h / group]; q and out [batch, heads, dim], caches [cache_slots, kv_heads,
// dim], slots [batch, width], all contiguous; dim <= kMaxHeadDim. A row with no context gives zeros. A row
// whose lengths or starts lie outside [0, width] and [0, lengths], or whose context names a slot outside
// [0, cache_slots), gives NaN (and reads no slot outside the cache), where the CPU kernel refuses.
template <typename T>
cudaError_t launch_paged_decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots,
                                          const int64_t* lengths, const int64_t* starts, int64_t batch, int64_t heads,
                                          int64_t kv_heads, int64_t dim, int64_t width, int64_t cache_slots,
                                          double scale, T* out, cudaStream_t stream);

}  // namespace alphalora::attention::cuda
