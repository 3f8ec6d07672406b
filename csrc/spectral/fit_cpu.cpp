// CPU kernels of the spectral ops: rows in parallel with OpenMP, each row by the pure C++ core.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "fit_checks.h"
#include "powerlaw_fit.h"

namespace alphalora::spectral {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> powerlaw_fit_cpu(
    const at::Tensor& evals, const at::Tensor& lengths, const at::Tensor& cand_lo,
    const at::Tensor& cand_hi, int64_t min_tail, bool bias_corrected) {
  check_fit_inputs(evals, lengths, cand_lo, cand_hi);
  const at::Tensor x = evals.contiguous();
  const at::Tensor len = lengths.contiguous(), lo = cand_lo.contiguous(), hi = cand_hi.contiguous();
  const int64_t batch = x.size(0), stride = x.size(1);
  at::Tensor alpha = at::empty({batch}, x.options());
  at::Tensor distance = at::empty({batch}, x.options());
  at::Tensor index = at::empty({batch}, len.options());
  const double* xp = x.data_ptr<double>();
  const int64_t* lenp = len.data_ptr<int64_t>();
  const int64_t* lop = lo.data_ptr<int64_t>();
  const int64_t* hip = hi.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lenp[b] >= 0 && lenp[b] <= stride, "lengths[", b, "]=", lenp[b],
                " is outside [0, ", stride, "]");
  }
  double* ap = alpha.data_ptr<double>();
  double* dp = distance.data_ptr<double>();
  int64_t* ip = index.data_ptr<int64_t>();
  const FitOptions options{min_tail, bias_corrected};
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch;
    for (int64_t b = begin; b < end; ++b) {
      scratch.resize(static_cast<size_t>(fit_scratch_bytes(lenp[b])));
      const FitResult r =
          fit_power_law(xp + b * stride, lenp[b], lop[b], hip[b], options, scratch.data());
      ap[b] = r.alpha;
      dp[b] = r.D;
      ip[b] = r.index;
    }
  });
  return {alpha, distance, index};
}

std::tuple<at::Tensor, at::Tensor> xmin_peak_window_cpu(const at::Tensor& evals,
                                                        const at::Tensor& lengths, int64_t bins,
                                                        bool log_lower_bound) {
  check_spectra(evals, lengths);
  TORCH_CHECK(bins >= 1, "bins must be positive, got ", bins);
  const at::Tensor x = evals.contiguous();
  const at::Tensor len = lengths.contiguous();
  const int64_t batch = x.size(0), stride = x.size(1);
  at::Tensor lo = at::empty({batch}, len.options());
  at::Tensor hi = at::empty({batch}, len.options());
  const int64_t* lenp = len.data_ptr<int64_t>();
  int64_t* lop = lo.data_ptr<int64_t>();
  int64_t* hip = hi.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "xmin_peak_window", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        TORCH_CHECK(lenp[b] >= 0 && lenp[b] <= stride, "lengths out of range");
        // The histogram is over log10 x: zero, negative, infinite or NaN values have no finite bin.
        const scalar_t* row = xp + b * stride;
        for (int64_t j = 0; lenp[b] >= 2 && j < lenp[b]; ++j) {
          TORCH_CHECK(row[j] > 0 && row[j] < std::numeric_limits<scalar_t>::infinity(), "xmin_peak_window: value ",
                      j, " of row ", b, " is ", row[j], "; the spectrum must be positive and finite (filter it first)");
        }
        const auto window = xmin_peak_window<scalar_t>(xp + b * stride, lenp[b], bins,
                                                       log_lower_bound);
        lop[b] = window.first;
        hip[b] = window.second;
      }
    });
  });
  return {lo, hi};
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CPU, m) {
  m.impl("powerlaw_fit", &powerlaw_fit_cpu);
  m.impl("xmin_peak_window", &xmin_peak_window_cpu);
}

}  // namespace alphalora::spectral
