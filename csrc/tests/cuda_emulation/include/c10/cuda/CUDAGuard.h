// Stands in for c10's CUDA device guard when the CUDA bindings run on the CPU (see
// ../../../emulated_cuda.h): there is one device, so the guard has nothing to switch.
#pragma once

#include <c10/core/Device.h>

#include "CUDAStream.h"

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};

}  // namespace c10::cuda
