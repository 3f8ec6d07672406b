// CUDA launchers for the batched power-law fit. Plain pointers and a stream: the .cu file
// includes no torch header, so nvcc compiles it in seconds and the standalone CMake library
// builds it without torch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace alphalora::spectral::cuda {

// Row b of x (stride `stride`) holds lengths[b] ascending values; candidates are [lo[b], hi[b]).
// Writes alpha/D/index per row (NaN, NaN, -1 when no candidate qualified).
// `workspace` holds 3 * batch * stride doubles.
cudaError_t launch_powerlaw_fit(const double* x, const int64_t* lengths, const int64_t* lo,
                                const int64_t* hi, int64_t batch, int64_t stride,
                                int64_t min_tail, bool bias_corrected, double* workspace,
                                double* alpha_out, double* d_out, int64_t* index_out,
                                cudaStream_t stream);

// The xmin_peak candidate window of every row (see xmin_peak_window in powerlaw_fit.h).
template <typename T>
cudaError_t launch_xmin_peak_window(const T* x, const int64_t* lengths, int64_t batch,
                                    int64_t stride, int64_t bins, bool log_lower_bound,
                                    int64_t* lo_out, int64_t* hi_out, cudaStream_t stream);

}  // namespace alphalora::spectral::cuda
