// The CUDA device API on the CPU, for running the project's kernels in CI without a GPU.
//
// A launch runs the grid's blocks one after another; a block's threads are fibers (ucontext) on the
// calling thread, each run until it reaches a barrier or returns. __syncthreads releases when every
// thread of the block that has not returned is waiting at it; __syncwarp and the warp shuffles
// release a warp the same way, and the shuffles exchange values through per-warp slots. What CUDA
// leaves undefined and a GPU would get away with by chance fails the launch with a message
// (cudaErrorLaunchFailure, then cudaGetErrorString): a full-mask shuffle or ballot after a lane has
// returned, one warp split between __syncthreads and a warp barrier, a deadlock, more than 1024
// threads a block or 48 KiB of dynamic shared memory. Threads take turns by one of three schedules
// (set_schedule), so a kernel whose result depends on the order of its threads between barriers (a
// missing __syncwarp or __syncthreads) gives different answers under them. Dynamic shared memory
// starts as all-ones bytes (NaN) in every block, as a GPU's holds whatever the last block left.
//
// Not emulated: the memory model beyond barriers, atomics, streams (launches run at once), timing.
#pragma once

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so a function-local static is the block's shared memory.
#define __shared__ static

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emulation {

// Runs body for every thread of the grid (see the header comment); the error, if any, is what
// cudaGetLastError returns next.
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t stream, const std::function<void()>& body);

// The calling fiber's coordinates, and the launch's shape.
const dim3& thread_index();
const dim3& block_index();
const dim3& block_dimensions();
const dim3& grid_dimensions();
void* dynamic_shared();

void sync_block();
void sync_warp(unsigned mask);
// Every lane's `bytes` (at most 8) of `value` into all[lane] (32 slots of 8 bytes), a barrier before and after.
void warp_exchange(unsigned mask, const void* value, size_t bytes, uint64_t* all);
int lane_id();

// How a block's threads take turns between barriers (see run_block in emulated_cuda.cpp): every thread to its
// next barrier, in increasing order (kLockstep, the default); or each warp as far as it can go before the
// next, warps and lanes in increasing or decreasing order.
enum class Schedule { kLockstep = 0, kRunAheadIncreasing = 1, kRunAheadDecreasing = 2 };
void set_schedule(Schedule schedule);

}  // namespace cuda_emulation

#define threadIdx (::cuda_emulation::thread_index())
#define blockIdx (::cuda_emulation::block_index())
#define blockDim (::cuda_emulation::block_dimensions())
#define gridDim (::cuda_emulation::grid_dimensions())

inline void __syncthreads() { cuda_emulation::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emulation::sync_warp(mask); }

template <typename T>
T emulated_shuffle_from(unsigned mask, T value, int source) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t all[32];
  cuda_emulation::warp_exchange(mask, &value, sizeof(T), all);
  if (source < 0 || source >= 32) return value;
  T out;
  std::memcpy(&out, &all[source], sizeof(T));
  return out;
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const int lane = cuda_emulation::lane_id();
  const int source = lane ^ lane_mask;
  return emulated_shuffle_from(mask, value, source / width == lane / width ? source : lane);
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  const int lane = cuda_emulation::lane_id();
  return emulated_shuffle_from(mask, value, lane / width * width + source_lane % width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const int lane = cuda_emulation::lane_id();
  const int source = lane + static_cast<int>(delta);
  return emulated_shuffle_from(mask, value, source / width == lane / width ? source : lane);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  uint64_t all[32];
  const int flag = predicate != 0;
  cuda_emulation::warp_exchange(mask, &flag, sizeof(flag), all);
  unsigned bits = 0;
  for (int lane = 0; lane < 32; ++lane) bits |= static_cast<unsigned>(all[lane] & 1u) << lane;
  return bits;
}

inline int __any_sync(unsigned mask, int predicate) { return (__ballot_sync(mask, predicate) & mask) != 0; }

inline int __popc(unsigned v) { return __builtin_popcount(v); }

// Explicitly rounded arithmetic: the emulation is compiled with -ffp-contract=off, so plain operators round.
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// bfloat16 and float16, bit-compatible with torch's (so a tensor's data pointer can be cast to them).
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t word = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
}

inline __nv_bfloat16 __float2bfloat16(float v) {  // round to nearest even, as cuda_bf16.h does
  if (std::isnan(v)) return {0x7fc0};
  uint32_t word;
  std::memcpy(&word, &v, sizeof(word));
  word += 0x7fffu + ((word >> 16) & 1u);
  return {static_cast<uint16_t>(word >> 16)};
}

inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof(h));
  return static_cast<float>(h);
}

inline __half __float2half(float v) {
  const _Float16 h = static_cast<_Float16>(v);
  __half out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
}

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream = nullptr);
