// Ops of the emulation itself, registered beside the emulated CUDA ops: the schedule switch, and
// small kernels that show what the emulation computes and what it refuses (its own tests). Written
// as device code; launched with cuda_emulation::launch, as the rewritten launches of the .cu files are.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "emulated_cuda.h"

namespace {

// Each warp's sum of x over its lanes, by xor shuffles: out[warp].
__global__ void warp_sums(const float* x, float* out) {
  float v = x[threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

// Every lane reads what lane 0 wrote, with (synchronised) or without a __syncwarp between.
__global__ void broadcast(bool synchronised, float* out) {
  extern __shared__ float value[];
  if (threadIdx.x == 0) value[0] = 1.0f;
  if (synchronised) __syncwarp();
  out[threadIdx.x] = value[0];
}

// Every thread of a block of two warps reads what thread 0 wrote, with or without a __syncthreads between.
__global__ void block_broadcast(bool synchronised, float* out) {
  extern __shared__ float value[];
  if (threadIdx.x == 0) value[0] = 1.0f;
  if (synchronised) __syncthreads();
  out[threadIdx.x] = value[0];
}

// A block-wide sum through shared memory and __syncthreads, one value per block: out[block].
__global__ void block_sums(const float* x, float* out) {
  __shared__ float partial[256];
  partial[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Half the warp returns, the other half shuffles with a full mask: undefined in CUDA.
__global__ void shuffle_after_return(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Half the warp waits at __syncthreads, the other half at __syncwarp.
__global__ void split_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1.0f;
}

void check(const char* what) {
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, what, " failed: ", cudaGetErrorString(error));
}

at::Tensor emulation_kernel(const std::string& name, const at::Tensor& x) {
  using cuda_emulation::launch;
  at::Tensor input = x.contiguous().to(at::kFloat);
  const float* in = input.data_ptr<float>();
  if (name == "warp_sums") {
    at::Tensor out = at::empty({input.numel() / 32}, input.options());
    float* o = out.data_ptr<float>();
    launch(dim3(1), dim3(static_cast<unsigned>(input.numel())), 0, nullptr, [&] { warp_sums(in, o); });
    check(name.c_str());
    return out;
  }
  if (name == "block_sums") {
    at::Tensor out = at::empty({input.numel() / 256}, input.options());
    float* o = out.data_ptr<float>();
    launch(dim3(static_cast<unsigned>(out.numel())), dim3(256), 0, nullptr, [&] { block_sums(in, o); });
    check(name.c_str());
    return out;
  }
  at::Tensor out = at::zeros({32}, input.options());
  float* o = out.data_ptr<float>();
  if (name == "broadcast" || name == "broadcast_synchronised") {
    const bool synchronised = name == "broadcast_synchronised";
    launch(dim3(1), dim3(32), sizeof(float), nullptr, [&] { broadcast(synchronised, o); });
  } else if (name == "block_broadcast" || name == "block_broadcast_synchronised") {
    const bool synchronised = name == "block_broadcast_synchronised";
    out = at::zeros({64}, input.options());
    o = out.data_ptr<float>();
    launch(dim3(1), dim3(64), sizeof(float), nullptr, [&] { block_broadcast(synchronised, o); });
  } else if (name == "shuffle_after_return") {
    launch(dim3(1), dim3(32), 0, nullptr, [&] { shuffle_after_return(o); });
  } else if (name == "split_barrier") {
    launch(dim3(1), dim3(32), 0, nullptr, [&] { split_barrier(o); });
  } else if (name == "too_many_threads") {
    launch(dim3(1), dim3(2048), 0, nullptr, [&] { split_barrier(o); });
  } else {
    TORCH_CHECK(false, "no emulation kernel named ", name);
  }
  check(name.c_str());
  return out;
}

void set_schedule(int64_t schedule) {
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "schedule is 0 (lockstep), 1 or 2 (warps run ahead), got ", schedule);
  cuda_emulation::set_schedule(static_cast<cuda_emulation::Schedule>(schedule));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(alphalora_cuda_emulated, m) {
  m.def("emulation_kernel(str name, Tensor x) -> Tensor");
  m.def("set_schedule(int schedule) -> ()", &set_schedule);
}

TORCH_LIBRARY_IMPL(alphalora_cuda_emulated, CPU, m) { m.impl("emulation_kernel", &emulation_kernel); }
