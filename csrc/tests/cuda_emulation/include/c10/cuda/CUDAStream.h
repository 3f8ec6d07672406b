// Stands in for c10's CUDA stream header when the CUDA bindings run on the CPU (see
// ../../../emulated_cuda.h): one stream, on which launches run at once.
#pragma once

#include <c10/core/Device.h>

#include "../../../emulated_cuda.h"

namespace c10::cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
