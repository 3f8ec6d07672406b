// Batched power-law fits on the GPU: one block prepares each spectrum (logs and the
// candidate alphas), one warp per candidate computes its exact KS distance over the whole
// tail, and one block per spectrum takes the first argmin. No pruning: on a GPU the
// N^2/2 terms of all spectra at once are cheaper than the branching.
#include "fit_cuda.h"

#include <cmath>

namespace alphalora::spectral::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// A spectrum's length as the CPU kernel and the reference read it: clamped to [0, stride].
__device__ inline int64_t row_length(const int64_t* lengths, int64_t b, int64_t stride) {
  return min(max(lengths[b], int64_t{0}), stride);
}

__global__ void prepare_kernel(const double* __restrict__ x, const int64_t* __restrict__ lengths,
                               const int64_t* __restrict__ lo, const int64_t* __restrict__ hi,
                               int64_t stride, int64_t min_tail, bool bias_corrected,
                               double* __restrict__ log_x, double* __restrict__ alpha) {
  const int64_t b = blockIdx.x;
  const int64_t n = row_length(lengths, b, stride);
  const double* row = x + b * stride;
  double* lrow = log_x + b * stride;
  double* arow = alpha + b * stride;
  for (int64_t j = threadIdx.x; j < stride; j += blockDim.x) {
    lrow[j] = j < n ? log(row[j]) : 0.0;
    arow[j] = nan("");
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const int64_t first = max(lo[b], int64_t{0});
  const int64_t last = min(hi[b], n - 1);
  // Same subtraction-free recurrence and the same order of additions as the CPU kernel, with
  // explicitly rounded operations: nvcc would otherwise fuse the multiply-add (the CPU does not).
  double tail_log_sum = 0.0;
  for (int64_t i = n - 2; i >= 0; --i) {
    tail_log_sum = __dadd_rn(tail_log_sum, __dmul_rn(static_cast<double>(n - i - 1), lrow[i + 1] - lrow[i]));
    if (i < first || i >= last || n - i < min_tail) continue;
    const double tail = static_cast<double>(n - i);
    double a = nan("");
    if (bias_corrected) {
      if (tail_log_sum > 1e-12) a = 1.0 + (tail - 1.0) / tail_log_sum;
    } else {
      a = 1.0 + tail / tail_log_sum;
    }
    if (a > 1.0 && !isinf(a)) arow[i] = a;
  }
}

__global__ void ks_kernel(const double* __restrict__ log_x, const double* __restrict__ alpha,
                          const int64_t* __restrict__ lengths, int64_t stride, int64_t candidate_blocks,
                          double* __restrict__ distance) {
  // A flat grid of spectra x candidate blocks (gridDim.y would cap the spectra at 65535).
  const int64_t b = blockIdx.x / candidate_blocks;
  const int64_t n = row_length(lengths, b, stride);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t i = (blockIdx.x % candidate_blocks) * kWarpsPerBlock + warp;
  if (i >= stride) return;
  const double* lrow = log_x + b * stride;
  const double a = alpha[b * stride + i];
  double d = INFINITY;
  if (i < n - 1 && !isnan(a)) {
    const int64_t tail = n - i;
    const double nd = static_cast<double>(tail);
    d = 0.0;
    for (int64_t k = lane; k < tail; k += 32) {
      const double cdf = 1.0 - exp((1.0 - a) * (lrow[i + k] - lrow[i]));
      d = fmax(d, fabs(cdf - static_cast<double>(k) / nd));
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      d = fmax(d, __shfl_down_sync(0xffffffffu, d, offset));
    }
  }
  if (lane == 0) distance[b * stride + i] = d;
}

__global__ void argmin_kernel(const double* __restrict__ distance,
                              const double* __restrict__ alpha, int64_t stride,
                              double* __restrict__ alpha_out, double* __restrict__ d_out,
                              int64_t* __restrict__ index_out) {
  __shared__ double best_d[kThreads];
  __shared__ int64_t best_i[kThreads];
  const int64_t b = blockIdx.x;
  double d = INFINITY;
  int64_t idx = -1;
  for (int64_t i = threadIdx.x; i < stride; i += blockDim.x) {
    const double v = distance[b * stride + i];
    if (v < d) {  // strict: within a thread, indices increase, so the first minimum stays
      d = v;
      idx = i;
    }
  }
  best_d[threadIdx.x] = d;
  best_i[threadIdx.x] = idx;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) {
      const double od = best_d[threadIdx.x + s];
      const int64_t oi = best_i[threadIdx.x + s];
      if (oi >= 0 && (od < best_d[threadIdx.x] ||
                      (od == best_d[threadIdx.x] && (best_i[threadIdx.x] < 0 ||
                                                     oi < best_i[threadIdx.x])))) {
        best_d[threadIdx.x] = od;
        best_i[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int64_t i = best_i[0];
    index_out[b] = i;
    alpha_out[b] = i >= 0 ? alpha[b * stride + i] : nan("");
    d_out[b] = i >= 0 ? best_d[0] : nan("");
  }
}

// Rounded multiply and add, never fused (the host code they mirror does not fuse them).
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ inline float sub_rn(float a, float b) { return __fsub_rn(a, b); }

// log10 and 10^x for float computed in double and rounded once: the correctly rounded value,
// where the device's own float versions may be an ulp away from the host's.
__device__ inline double host_log10(double v) { return log10(v); }
__device__ inline float host_log10(float v) { return static_cast<float>(log10(static_cast<double>(v))); }
__device__ inline double host_pow10(double v) { return pow(10.0, v); }
__device__ inline float host_pow10(float v) { return static_cast<float>(pow(10.0, static_cast<double>(v))); }

template <typename T>
__device__ T linspace_at(T start, T end, int64_t steps, int64_t idx) {
  const T step = (end - start) / static_cast<T>(steps - 1);
  if (idx < steps / 2) return add_rn(start, mul_rn(step, static_cast<T>(idx)));
  return sub_rn(end, mul_rn(step, static_cast<T>(steps - idx - 1)));
}

// One thread per spectrum: the histogram of a sorted spectrum is a run-length scan.
template <typename T>
__global__ void peak_window_kernel(const T* __restrict__ x, const int64_t* __restrict__ lengths,
                                   int64_t batch, int64_t stride, int64_t bins,
                                   bool log_lower_bound, int64_t* __restrict__ lo_out,
                                   int64_t* __restrict__ hi_out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const T* row = x + b * stride;
  const int64_t n = row_length(lengths, b, stride);
  if (n < 2) {
    lo_out[b] = 0;
    hi_out[b] = 0;
    return;
  }
  const T left = host_log10(row[0]);
  const T right = host_log10(row[n - 1]);
  int64_t peak_bin = 0;
  if (right > left) {
    int64_t best_count = -1, current_bin = -1, current_count = 0;
    for (int64_t j = 0; j <= n; ++j) {
      int64_t bin = -2;
      if (j < n) {
        const T position = (host_log10(row[j]) - left) * static_cast<T>(bins) / (right - left);
        // Clamped before the cast, which is undefined for NaN or out-of-range values (zero, negative
        // or non-finite eigenvalues, which the CPU binding refuses; here they fall in a bin at an end).
        bin = position >= static_cast<T>(bins - 1) ? bins - 1 : position > 0 ? static_cast<int64_t>(position) : 0;
      }
      if (bin != current_bin) {
        if (current_bin >= 0 && (current_count > best_count ||
                                 (current_count == best_count && current_bin < peak_bin))) {
          best_count = current_count;
          peak_bin = current_bin;
        }
        current_bin = bin;
        current_count = 0;
      }
      ++current_count;
    }
  }
  const T peak = host_pow10(linspace_at<T>(left, right, bins + 1, peak_bin));
  const T lower = log_lower_bound ? host_log10(static_cast<T>(0.95) * peak) : static_cast<T>(0.95) * peak;
  const T upper = static_cast<T>(1.5) * peak;
  int64_t lo = 0;
  while (lo < n - 1 && row[lo] < lower) ++lo;
  int64_t hi = lo;
  while (hi < n - 1 && !(row[hi] > upper)) ++hi;
  lo_out[b] = lo;
  hi_out[b] = hi;
}

}  // namespace

cudaError_t launch_powerlaw_fit(const double* x, const int64_t* lengths, const int64_t* lo,
                                const int64_t* hi, int64_t batch, int64_t stride,
                                int64_t min_tail, bool bias_corrected, double* workspace,
                                double* alpha_out, double* d_out, int64_t* index_out,
                                cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  double* log_x = workspace;
  double* alpha = log_x + batch * stride;
  double* distance = alpha + batch * stride;
  if (stride > 0) {  // with no eigenvalues at all, argmin alone writes (NaN, NaN, -1) per spectrum
    prepare_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
        x, lengths, lo, hi, stride, min_tail, bias_corrected, log_x, alpha);
    const int64_t candidate_blocks = (stride + kWarpsPerBlock - 1) / kWarpsPerBlock;
    ks_kernel<<<static_cast<unsigned>(batch * candidate_blocks), kThreads, 0, stream>>>(
        log_x, alpha, lengths, stride, candidate_blocks, distance);
  }
  argmin_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      distance, alpha, stride, alpha_out, d_out, index_out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_xmin_peak_window(const T* x, const int64_t* lengths, int64_t batch,
                                    int64_t stride, int64_t bins, bool log_lower_bound,
                                    int64_t* lo_out, int64_t* hi_out, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((batch + 127) / 128);
  peak_window_kernel<T><<<blocks, 128, 0, stream>>>(x, lengths, batch, stride, bins,
                                                    log_lower_bound, lo_out, hi_out);
  return cudaGetLastError();
}

template cudaError_t launch_xmin_peak_window<float>(const float*, const int64_t*, int64_t,
                                                    int64_t, int64_t, bool, int64_t*, int64_t*,
                                                    cudaStream_t);
template cudaError_t launch_xmin_peak_window<double>(const double*, const int64_t*, int64_t,
                                                     int64_t, int64_t, bool, int64_t*, int64_t*,
                                                     cudaStream_t);

}  // namespace alphalora::spectral::cuda
