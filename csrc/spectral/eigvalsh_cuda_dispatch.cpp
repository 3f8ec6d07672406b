// eigvalsh_batched on the GPU: cuSOLVER's syevd (through ATen) on several streams at once.
//
// ATen solves a batch of large symmetric matrices one after another, and each solve is a long
// chain of small, dependent kernels (the panels of the tridiagonal reduction) that leaves most of
// the GPU idle, ending in a host synchronisation on its error code. Here host threads each take
// every k-th matrix of the batch on a stream of their own, so the solves overlap. The batch's
// Grams come from the caller's stream: the worker streams wait for it, and it waits for them.
// ALPHALORA_EIGH_STREAMS sets the number of streams (1: ATen's own loop).
#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace alphalora::spectral {
namespace {

constexpr int64_t kDefaultStreams = 4;

void check(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "eigvalsh_batched: ", what, " failed: ", cudaGetErrorString(status));
}

// A point in a stream's work that other streams can wait for (ATen's CUDAEvent, without the
// cuBLAS/cuSPARSE headers it pulls in).
class StreamEvent {
 public:
  StreamEvent() { check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate"); }
  ~StreamEvent() { cudaEventDestroy(event_); }
  StreamEvent(const StreamEvent&) = delete;
  StreamEvent& operator=(const StreamEvent&) = delete;
  void record(cudaStream_t stream) { check(cudaEventRecord(event_, stream), "cudaEventRecord"); }
  void block(cudaStream_t stream) const { check(cudaStreamWaitEvent(stream, event_, 0), "cudaStreamWaitEvent"); }

 private:
  cudaEvent_t event_ = nullptr;
};

int64_t stream_count() {
  const char* value = std::getenv("ALPHALORA_EIGH_STREAMS");
  if (value == nullptr || *value == '\0') return kDefaultStreams;
  const int64_t parsed = std::atoll(value);
  TORCH_CHECK(parsed >= 1, "ALPHALORA_EIGH_STREAMS must be a positive integer, got '", value, "'");
  return parsed;
}

at::Tensor eigvalsh_batched_cuda(const at::Tensor& grams) {
  TORCH_CHECK(grams.dim() == 3 && grams.size(1) == grams.size(2),
              "eigvalsh_batched takes (batch, n, n) symmetric matrices, got ", grams.sizes());
  // As on the CPU: a complex batch would otherwise pass, its real eigenvalues copied into a complex `values`.
  TORCH_CHECK(at::isFloatingType(grams.scalar_type()), "eigvalsh_batched takes float32 or float64");
  const int64_t batch = grams.size(0);
  const int64_t streams = std::min(stream_count(), batch);
  if (streams <= 1) return at::linalg_eigvalsh(grams);

  const c10::cuda::CUDAGuard device_guard(grams.device());
  // ATen loads its CUDA linear-algebra library on the first solve, and that lazy loading fails ("lazy wrapper
  // should be called at most once") when several threads make the first solve at once: one small solve on the
  // caller's thread loads it, once per process.
  static std::once_flag linalg_loaded;
  std::call_once(linalg_loaded, [&] { at::linalg_eigvalsh(at::ones({1, 1}, grams.options())); });
  const c10::DeviceIndex device = grams.device().index();
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device);
  at::Tensor values = at::empty({batch, grams.size(1)}, grams.options());
  StreamEvent inputs_ready;
  inputs_ready.record(caller);
  std::vector<StreamEvent> done(streams);
  std::vector<std::exception_ptr> errors(streams);
  // The caller's thread-local state (grad and inference mode, the dispatch keys already handled):
  // without it a worker would run as a fresh thread, outside the caller's inference_mode, say.
  const at::ThreadLocalState caller_state;
  const auto solve = [&](int64_t worker) {
    try {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      const c10::cuda::CUDAGuard guard(device);
      const c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, device);
      try {
        inputs_ready.block(stream);
        const c10::cuda::CUDAStreamGuard on_stream(stream);
        for (int64_t b = worker; b < batch; b += streams) values[b].copy_(at::linalg_eigvalsh(grams[b]));
      } catch (...) {
        errors[worker] = std::current_exception();
      }
      done[worker].record(stream);  // also after an error: the caller's stream must not outrun this one
    } catch (...) {
      if (!errors[worker]) errors[worker] = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(streams);
  // The caller's stream waits for every worker's, also on the way out with an error: `values`, written
  // there, is freed on the caller's stream.
  const auto finish = [&] {
    for (std::thread& thread : workers) thread.join();
    for (size_t worker = 0; worker < workers.size(); ++worker) done[worker].block(caller);
  };
  try {
    for (int64_t worker = 0; worker < streams; ++worker) workers.emplace_back(solve, worker);
  } catch (...) {  // a thread that could not start: wait for those that did, then report it
    finish();
    throw;
  }
  finish();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  return values;
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CUDA, m) { m.impl("eigvalsh_batched", &eigvalsh_batched_cuda); }

}  // namespace alphalora::spectral
