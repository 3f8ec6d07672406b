// Argument checks shared by the CPU and CUDA bindings of the spectral ops.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>

namespace alphalora::spectral {

inline void check_spectra(const at::Tensor& evals, const at::Tensor& lengths) {
  TORCH_CHECK(evals.dim() == 2, "evals must be (batch, max_len), got ", evals.dim(), " dims");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == evals.size(0),
              "lengths must be (batch,) matching evals");
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "lengths must be int64");
  TORCH_CHECK(lengths.device() == evals.device(), "lengths must be on evals' device");
}

inline void check_bounds(const at::Tensor& evals, const at::Tensor& bound, const char* name) {
  TORCH_CHECK(bound.dim() == 1 && bound.size(0) == evals.size(0), name,
              " must be (batch,) matching evals");
  TORCH_CHECK(bound.scalar_type() == at::kLong, name, " must be int64");
  TORCH_CHECK(bound.device() == evals.device(), name, " must be on evals' device");
}

// The inputs of powerlaw_fit: float64 spectra with int64 lengths and per-spectrum candidate bounds.
inline void check_fit_inputs(const at::Tensor& evals, const at::Tensor& lengths, const at::Tensor& cand_lo,
                             const at::Tensor& cand_hi) {
  check_spectra(evals, lengths);
  check_bounds(evals, cand_lo, "cand_lo");
  check_bounds(evals, cand_hi, "cand_hi");
  TORCH_CHECK(evals.scalar_type() == at::kDouble, "powerlaw_fit fits in float64; got ",
              evals.scalar_type());
}

}  // namespace alphalora::spectral
