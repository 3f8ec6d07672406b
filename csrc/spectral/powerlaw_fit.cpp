#include "powerlaw_fit.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace alphalora::spectral {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
// Sampled tail positions per candidate for the pruning lower bound.
constexpr int64_t kBoundSamples = 8;
// Below this many candidates, pruning costs more than it saves.
constexpr int64_t kPruneMinCandidates = 48;

// One KS term of candidate i at tail offset k: |F_i(x_{i+k}) - k/n_i|.
inline double ks_term(const double* log_x, int64_t i, int64_t k, double alpha, double n) {
  const double cdf = 1.0 - std::exp((1.0 - alpha) * (log_x[i + k] - log_x[i]));
  return std::fabs(cdf - static_cast<double>(k) / n);
}

// The KS distance of candidate i, or the first term found above `cutoff` (which proves the
// candidate cannot win). `hot` is a tail position tried first; it is updated to the position
// that exceeded the cutoff so the next candidate can try it first too.
double ks_distance_with_cutoff(const double* log_x, int64_t n_total, int64_t i, double alpha,
                               double cutoff, int64_t* hot) {
  const int64_t n = n_total - i;
  const double nd = static_cast<double>(n);
  const int64_t k_hot = *hot - i;
  if (k_hot > 0 && k_hot < n) {
    const double t = ks_term(log_x, i, k_hot, alpha, nd);
    if (t > cutoff) return t;
  }
  double d = 0.0;
  for (int64_t k = 1; k < n; ++k) {
    const double t = ks_term(log_x, i, k, alpha, nd);
    if (t > d) {
      d = t;
      if (d > cutoff) {
        *hot = i + k;
        return d;
      }
    }
  }
  return d;
}

}  // namespace

int64_t fit_scratch_bytes(int64_t n) {
  return 3 * n * static_cast<int64_t>(sizeof(double)) + n * static_cast<int64_t>(sizeof(int64_t));
}

double ks_distance(const double* log_x, int64_t n, int64_t i, double alpha) {
  const double nd = static_cast<double>(n - i);
  double d = 0.0;
  for (int64_t k = 0; k < n - i; ++k) d = std::max(d, ks_term(log_x, i, k, alpha, nd));
  return d;
}

FitResult fit_power_law(const double* x, int64_t n, int64_t lo, int64_t hi,
                        const FitOptions& options, void* scratch) {
  FitResult result{kNaN, kNaN, -1};
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, n - 1);
  if (n < 2 || lo >= hi) return result;

  auto* log_x = static_cast<double*>(scratch);
  double* alpha = log_x + n;
  double* bound = alpha + n;
  auto* order = reinterpret_cast<int64_t*>(bound + n);

  for (int64_t j = 0; j < n; ++j) log_x[j] = std::log(x[j]);

  // T_i = sum_{j>=i} (L_j - L_i) by the subtraction-free recurrence
  // T_i = T_{i+1} + (n - i - 1)(L_{i+1} - L_i): every term is non-negative.
  double tail_log_sum = 0.0;
  int64_t n_candidates = 0;
  for (int64_t i = n - 2; i >= 0; --i) {
    tail_log_sum += static_cast<double>(n - i - 1) * (log_x[i + 1] - log_x[i]);
    if (i < lo || i >= hi) continue;
    const double tail = static_cast<double>(n - i);
    double a = kNaN;
    if (n - i >= options.min_tail) {
      if (options.bias_corrected) {
        if (tail_log_sum > 1e-12) a = 1.0 + (tail - 1.0) / tail_log_sum;
      } else {
        a = 1.0 + tail / tail_log_sum;
      }
    }
    // alpha <= 1 (D := 1 in WeightWatcher) and alpha = inf (a constant tail) never win.
    if (!(a > 1.0) || std::isinf(a)) a = kNaN;
    alpha[i] = a;
    if (!std::isnan(a)) order[n_candidates++] = i;
  }
  if (n_candidates == 0) return result;

  double best_d = kInf;
  int64_t best_i = -1;
  int64_t hot = -1;
  auto consider = [&](int64_t i) {
    const double d = ks_distance_with_cutoff(log_x, n, i, alpha[i], best_d, &hot);
    if (d < best_d || (d == best_d && i < best_i)) {
      best_d = d;
      best_i = i;
    }
  };

  if (n_candidates < kPruneMinCandidates) {
    for (int64_t c = 0; c < n_candidates; ++c) consider(order[c]);
  } else {
    // Lower bound of each D_i: the max over a few sampled tail positions. The candidate with
    // the smallest bound gives a first D*, then only candidates whose bound does not exceed the
    // current D* can win; D* only falls, so none that could is skipped: the argmin is exact.
    int64_t seed = order[0];
    for (int64_t c = 0; c < n_candidates; ++c) {
      const int64_t i = order[c];
      const int64_t tail = n - i;
      const double nd = static_cast<double>(tail);
      double lb = 0.0;
      for (int64_t s = 1; s < kBoundSamples; ++s) {
        const int64_t k = s * (tail - 1) / (kBoundSamples - 1);
        lb = std::max(lb, ks_term(log_x, i, k, alpha[i], nd));
      }
      bound[i] = lb;
      if (lb < bound[seed] || (lb == bound[seed] && i < seed)) seed = i;
    }
    consider(seed);
    for (int64_t c = n_candidates - 1; c >= 0; --c) {  // order[] holds descending indices
      const int64_t i = order[c];
      if (i != seed && !(bound[i] > best_d)) consider(i);
    }
  }
  result.alpha = alpha[best_i];
  result.D = best_d;
  result.index = best_i;
  return result;
}

namespace {

// torch.linspace(start, end, steps)[idx], computed the way ATen's CPU kernel does.
template <typename T>
T linspace_at(T start, T end, int64_t steps, int64_t idx) {
  const T step = (end - start) / static_cast<T>(steps - 1);
  const int64_t halfway = steps / 2;
  if (idx < halfway) return start + step * static_cast<T>(idx);
  return end - step * static_cast<T>(steps - idx - 1);
}

}  // namespace

template <typename T>
std::pair<int64_t, int64_t> xmin_peak_window(const T* x, int64_t n, int64_t bins,
                                             bool log_lower_bound) {
  if (n < 2 || bins < 1) return {0, 0};
  const T left = std::log10(x[0]);
  const T right = std::log10(x[n - 1]);
  int64_t peak_bin = 0;
  if (right > left) {
    // torch.histc: bin = trunc((v - min) * bins / (max - min)), the max value in the last bin.
    int64_t best_count = -1;
    int64_t current_bin = -1, current_count = 0;
    auto flush = [&]() {
      if (current_count > best_count || (current_count == best_count && current_bin < peak_bin)) {
        best_count = current_count;
        peak_bin = current_bin;
      }
    };
    // Bins are non-decreasing along the sorted spectrum, so counts come in runs.
    for (int64_t j = 0; j < n; ++j) {
      const T position = (std::log10(x[j]) - left) * static_cast<T>(bins) / (right - left);
      // Clamped before the cast, which is undefined for NaN or out-of-range values (the bindings
      // refuse non-positive and non-finite spectra; this keeps the core defined regardless).
      const int64_t b = position >= static_cast<T>(bins - 1) ? bins - 1
                        : position > 0                          ? static_cast<int64_t>(position)
                                                                : 0;
      if (b != current_bin) {
        if (current_bin >= 0) flush();
        current_bin = b;
        current_count = 0;
      }
      ++current_count;
    }
    flush();
  }
  const T peak = std::pow(static_cast<T>(10), linspace_at<T>(left, right, bins + 1, peak_bin));
  const T lower = log_lower_bound ? std::log10(static_cast<T>(0.95) * peak)
                                  : static_cast<T>(0.95) * peak;
  const T upper = static_cast<T>(1.5) * peak;
  int64_t lo = 0;
  while (lo < n - 1 && x[lo] < lower) ++lo;
  int64_t hi = lo;
  while (hi < n - 1 && !(x[hi] > upper)) ++hi;
  return {lo, hi};
}

template std::pair<int64_t, int64_t> xmin_peak_window<float>(const float*, int64_t, int64_t, bool);
template std::pair<int64_t, int64_t> xmin_peak_window<double>(const double*, int64_t, int64_t,
                                                              bool);

}  // namespace alphalora::spectral
