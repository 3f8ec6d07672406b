// Eigenvalues of a batch of symmetric matrices on the CPU, one matrix per thread.
// torch.linalg.eigvalsh solves a batch one matrix after another and leaves the parallelism
// to LAPACK, which uses few cores well at these sizes; whole matrices per thread is faster.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace alphalora::spectral {
namespace {

at::Tensor eigvalsh_batched_cpu(const at::Tensor& grams) {
  TORCH_CHECK(grams.dim() == 3 && grams.size(1) == grams.size(2),
              "eigvalsh_batched takes (batch, n, n) symmetric matrices, got ", grams.sizes());
  TORCH_CHECK(at::isFloatingType(grams.scalar_type()), "eigvalsh_batched takes float32 or float64");
  at::Tensor out = at::empty({grams.size(0), grams.size(1)}, grams.options());
  at::parallel_for(0, grams.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) out[b].copy_(at::linalg_eigvalsh(grams[b]));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(alphalora, CPU, m) { m.impl("eigvalsh_batched", &eigvalsh_batched_cpu); }

}  // namespace alphalora::spectral
