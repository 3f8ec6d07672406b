// Unit tests of the torch-free power-law fit core: known exponents, the pruned argmin
// against brute force, and a hand-computed xmin_peak window.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

#include "spectral/powerlaw_fit.h"

using alphalora::spectral::FitOptions;
using alphalora::spectral::FitResult;
using alphalora::spectral::fit_power_law;
using alphalora::spectral::fit_scratch_bytes;
using alphalora::spectral::ks_distance;
using alphalora::spectral::xmin_peak_window;

static int failures = 0;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++failures;                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

static FitResult fit(const std::vector<double>& x, int64_t lo, int64_t hi, FitOptions options = {}) {
  std::vector<char> scratch(fit_scratch_bytes(static_cast<int64_t>(x.size())));
  return fit_power_law(x.data(), static_cast<int64_t>(x.size()), lo, hi, options, scratch.data());
}

// Every candidate evaluated in full, with alpha from plain suffix sums: the definition.
static FitResult brute_force(const std::vector<double>& x, int64_t lo, int64_t hi, FitOptions options) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<double> log_x(n);
  for (int64_t j = 0; j < n; ++j) log_x[j] = std::log(x[j]);
  FitResult best{std::nan(""), std::nan(""), -1};
  double best_d = std::numeric_limits<double>::infinity();
  for (int64_t i = std::max<int64_t>(lo, 0); i < std::min<int64_t>(hi, n - 1); ++i) {
    const double tail = static_cast<double>(n - i);
    if (n - i < options.min_tail) continue;
    double s = 0.0;
    for (int64_t j = i; j < n; ++j) s += log_x[j] - log_x[i];
    double alpha;
    if (options.bias_corrected) {
      if (!(s > 1e-12)) continue;
      alpha = 1.0 + (tail - 1.0) / s;
    } else {
      alpha = 1.0 + tail / s;
    }
    if (!(alpha > 1.0) || std::isinf(alpha)) continue;
    const double d = ks_distance(log_x.data(), n, i, alpha);
    if (d < best_d) {
      best_d = d;
      best = {alpha, d, i};
    }
  }
  return best;
}

static std::vector<double> pareto_quantiles(double exponent, int64_t n) {
  std::vector<double> x(n);
  for (int64_t i = 0; i < n; ++i) {
    const double q = (static_cast<double>(i) + 0.5) / static_cast<double>(n);
    x[i] = std::pow(1.0 - q, -1.0 / (exponent - 1.0));
  }
  return x;
}

// A sorted pseudo-random spectrum: a log-normal bulk with a Pareto tail mixed in.
static std::vector<double> random_spectrum(uint64_t seed, int64_t n) {
  std::vector<double> x(n);
  uint64_t state = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  auto uniform = [&]() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (static_cast<double>(state >> 11) + 0.5) / 9007199254740992.0;
  };
  for (int64_t i = 0; i < n; ++i) {
    const double u = uniform();
    x[i] = uniform() < 0.2 ? std::pow(u, -1.0 / (1.0 + 3.0 * uniform())) : std::exp(std::sqrt(-2 * std::log(u)) * std::cos(6.283185307179586 * uniform()));
  }
  std::sort(x.begin(), x.end());
  return x;
}

static void test_known_exponents() {
  for (double exponent : {2.0, 3.0, 4.0}) {
    const auto x = pareto_quantiles(exponent, 2000);
    const FitResult r = fit(x, 0, 2000);
    EXPECT(std::fabs(r.alpha - exponent) < 0.02 * exponent, "exponent %g got alpha %g", exponent, r.alpha);
    EXPECT(r.index >= 0 && r.index < 1999, "index %lld", static_cast<long long>(r.index));
  }
}

static void test_pruned_equals_brute_force() {
  const FitOptions option_sets[] = {{1, false}, {8, true}, {30, false}};
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    const int64_t n = 20 + static_cast<int64_t>(seed * 37 % 700);
    const auto x = random_spectrum(seed, n);
    for (const FitOptions& options : option_sets) {
      const int64_t lo = static_cast<int64_t>(seed % 5) * n / 10;
      const int64_t hi = seed % 3 == 0 ? n : lo + n / 2;
      const FitResult got = fit(x, lo, hi, options);
      const FitResult want = brute_force(x, lo, hi, options);
      EXPECT(got.index == want.index, "seed %llu n %lld: index %lld vs %lld", static_cast<unsigned long long>(seed),
             static_cast<long long>(n), static_cast<long long>(got.index), static_cast<long long>(want.index));
      if (want.index >= 0) {
        EXPECT(std::fabs(got.alpha - want.alpha) <= 1e-10 * want.alpha, "alpha %.17g vs %.17g", got.alpha, want.alpha);
        EXPECT(std::fabs(got.D - want.D) <= 1e-12, "D %.17g vs %.17g", got.D, want.D);
      }
    }
  }
}

static void test_no_candidate() {
  const auto x = pareto_quantiles(3.0, 50);
  const FitResult empty = fit(x, 10, 10);
  EXPECT(empty.index == -1 && std::isnan(empty.alpha), "empty window must report no fit");
  const FitResult short_tail = fit(x, 0, 49, {100, false});
  EXPECT(short_tail.index == -1, "tails shorter than min_tail must be skipped");
  const std::vector<double> single = {1.0};
  EXPECT(fit(single, 0, 1).index == -1, "one value cannot be fitted");
}

static void test_peak_window_by_hand() {
  // log10 values -2, -1, 0, 0, 0, 1, 2: the fullest of 100 bins over [-2, 2] starts at 0, so
  // the peak is 10^0 = 1 and the upper bound 1.5: candidates stop before the value 10.
  const std::vector<double> x = {0.01, 0.1, 1.0, 1.0, 1.0, 10.0, 100.0};
  const auto quirk = xmin_peak_window<double>(x.data(), 7, 100, true);
  EXPECT(quirk.first == 0 && quirk.second == 5, "log lower bound: [%lld, %lld)",
         static_cast<long long>(quirk.first), static_cast<long long>(quirk.second));
  const auto intended = xmin_peak_window<double>(x.data(), 7, 100, false);
  EXPECT(intended.first == 2 && intended.second == 5, "intended lower bound: [%lld, %lld)",
         static_cast<long long>(intended.first), static_cast<long long>(intended.second));
  const std::vector<float> xf(x.begin(), x.end());
  const auto quirk_f = xmin_peak_window<float>(xf.data(), 7, 100, true);
  EXPECT(quirk_f.first == 0 && quirk_f.second == 5, "float: [%lld, %lld)",
         static_cast<long long>(quirk_f.first), static_cast<long long>(quirk_f.second));
}

int main() {
  test_known_exponents();
  test_pruned_equals_brute_force();
  test_no_candidate();
  test_peak_window_by_hand();
  if (failures == 0) std::printf("all power-law fit tests passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
