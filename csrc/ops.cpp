// Every schema of the alphalora op library, in one place. Backends register their kernels
// with TORCH_LIBRARY_IMPL in their own files; fake kernels and autograd live in
// alphalora/ops/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import alphalora._C` load this shared library (and so run the registrations below)
// without exposing any Python binding.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(alphalora, m) {
  // Batched exact power-law fit over candidate xmin indices [cand_lo, cand_hi) of each row of
  // `evals` (float64, ascending in its first lengths[b] entries). Returns (alpha, D, index).
  m.def(
      "powerlaw_fit(Tensor evals, Tensor lengths, Tensor cand_lo, Tensor cand_hi, "
      "int min_tail, bool bias_corrected) -> (Tensor, Tensor, Tensor)");
  // Ascending eigenvalues of a batch of symmetric matrices (batch, n, n) -> (batch, n).
  m.def("eigvalsh_batched(Tensor grams) -> Tensor");
  // The xmin_peak (fix-finger) candidate window [lo, hi) of each row, in evals' dtype.
  m.def(
      "xmin_peak_window(Tensor evals, Tensor lengths, int bins, bool log_lower_bound) "
      "-> (Tensor, Tensor)");
}
