// Power-law fits of eigenvalue spectra: the pure C++ core, free of torch so that the
// standalone library and its ctest suite build without it.
//
// Conventions follow WeightWatcher 0.7.7 (WWFit) and the TempBalance family:
//   x_0 <= ... <= x_{N-1} (ascending), L_j = ln x_j, n_i = N - i (the tail includes x_i),
//   alpha_i = 1 + n_i / T_i           with T_i = sum_{j>=i} (L_j - L_i)
//   alpha_i = 1 + (n_i - 1) / T_i     (bias-corrected, WeightWatcher's small-N branch)
//   D_i     = max_{k<n_i} |1 - exp((1 - alpha_i)(L_{i+k} - L_i)) - k / n_i|
// and the fit picks the first index minimising D_i.
#pragma once

#include <cstdint>
#include <utility>

namespace alphalora::spectral {

struct FitOptions {
  int64_t min_tail = 1;         // candidates with fewer tail values are skipped
  bool bias_corrected = false;  // alpha = 1 + (n - 1) / T, and T <= 1e-12 skips the candidate
};

struct FitResult {
  double alpha;   // NaN when no candidate qualified
  double D;       // NaN when no candidate qualified
  int64_t index;  // index of xmin in x, or -1 when no candidate qualified
};

// Fits one ascending spectrum x[0..n) over candidate indices [lo, hi) (hi is clamped to n - 1,
// the largest value is never a candidate). Exact: returns the same argmin as evaluating every
// candidate's KS distance, but prunes candidates with sampled lower bounds.
// `scratch` must hold 4 * n doubles + n int64 values (see fit_scratch_bytes).
FitResult fit_power_law(const double* x, int64_t n, int64_t lo, int64_t hi,
                        const FitOptions& options, void* scratch);

// Bytes of scratch memory fit_power_law needs for a spectrum of n values.
int64_t fit_scratch_bytes(int64_t n);

// The KS distance of candidate i evaluated over its whole tail (no pruning); used by tests
// and by callers that want D for a fixed xmin.
double ks_distance(const double* log_x, int64_t n, int64_t i, double alpha);

// Candidate window [lo, hi) of the "xmin_peak" (fix-finger) estimator of TempBalance,
// AlphaPruning and AlphaLoRA: a 100-bin torch.histc-style histogram of log10 x over
// [log10 x_0, log10 x_{n-1}], peak p = 10^(left edge of the first fullest bin), candidates
// x_i in [lower, 1.5 p], with lower = log10(0.95 p) (the authors' code, a log value compared
// with a linear one) or 0.95 p (the intended bound). Arithmetic in T, like the authors' code.
template <typename T>
std::pair<int64_t, int64_t> xmin_peak_window(const T* x, int64_t n, int64_t bins,
                                             bool log_lower_bound);

}  // namespace alphalora::spectral
