// Stands in for the CUDA toolkit header when the kernels run on the CPU (see ../emulated_cuda.h).
#pragma once
#include "../emulated_cuda.h"
