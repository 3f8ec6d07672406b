// CUDA bindings of the spectral ops: checks, allocation and stream, then the plain-CUDA
// launchers of fit_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fit_checks.h"
#include "fit_cuda.h"

namespace alphalora::spectral {
namespace {

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> powerlaw_fit_cuda(
    const at::Tensor& evals, const at::Tensor& lengths, const at::Tensor& cand_lo,
    const at::Tensor& cand_hi, int64_t min_tail, bool bias_corrected) {
  check_fit_inputs(evals, lengths, cand_lo, cand_hi);
  const c10::cuda::CUDAGuard guard(evals.device());
  const at::Tensor x = evals.contiguous();
  const at::Tensor len = lengths.contiguous(), lo = cand_lo.contiguous(), hi = cand_hi.contiguous();
  const int64_t batch = x.size(0), stride = x.size(1);
  at::Tensor alpha = at::empty({batch}, x.options());
  at::Tensor distance = at::empty({batch}, x.options());
  at::Tensor index = at::empty({batch}, len.options());
  at::Tensor workspace = at::empty({3 * batch * stride}, x.options());
  check_launch(cuda::launch_powerlaw_fit(
                   x.data_ptr<double>(), len.data_ptr<int64_t>(), lo.data_ptr<int64_t>(),
                   hi.data_ptr<int64_t>(), batch, stride, min_tail, bias_corrected,
                   workspace.data_ptr<double>(), alpha.data_ptr<double>(),
                   distance.data_ptr<double>(), index.data_ptr<int64_t>(),
                   c10::cuda::getCurrentCUDAStream()),
               "powerlaw_fit kernel");
  return {alpha, distance, index};
}

std::tuple<at::Tensor, at::Tensor> xmin_peak_window_cuda(const at::Tensor& evals,
                                                         const at::Tensor& lengths, int64_t bins,
                                                         bool log_lower_bound) {
  check_spectra(evals, lengths);
  TORCH_CHECK(bins >= 1, "bins must be positive, got ", bins);
  const c10::cuda::CUDAGuard guard(evals.device());
  const at::Tensor x = evals.contiguous();
  const at::Tensor len = lengths.contiguous();
  const int64_t batch = x.size(0), stride = x.size(1);
  at::Tensor lo = at::empty({batch}, len.options());
  at::Tensor hi = at::empty({batch}, len.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t status;
  if (x.scalar_type() == at::kDouble) {
    status = cuda::launch_xmin_peak_window<double>(x.data_ptr<double>(), len.data_ptr<int64_t>(),
                                                   batch, stride, bins, log_lower_bound,
                                                   lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(),
                                                   stream);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "xmin_peak_window takes float32 or float64");
    status = cuda::launch_xmin_peak_window<float>(x.data_ptr<float>(), len.data_ptr<int64_t>(),
                                                  batch, stride, bins, log_lower_bound,
                                                  lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(),
                                                  stream);
  }
  check_launch(status, "xmin_peak_window kernel");
  return {lo, hi};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) {
  m.impl("powerlaw_fit", &powerlaw_fit_cuda);
  m.impl("xmin_peak_window", &xmin_peak_window_cuda);
}

}  // namespace alphalora::spectral
