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

  // Mixture-of-LoRA-experts routing. Pairs are top-k (token, slot) choices, p = t * k + j, each
  // naming a (virtual) expert: with several adapters in one batch, ids are offset per adapter.
  // moe_permute counting-sorts pairs by expert: order (pairs grouped by expert) and offsets.
  // validate=False skips the range check of the ids on a GPU (a host sync per call) for callers
  // whose ids are in range by construction (top-k over their own experts); the CPU always checks. (Unchecked,
  // such pairs are listed after every expert's range: order is always a permutation of the pairs.)
  // The grouped ops take order and offsets as moe_permute makes them for their expert_ids: the CPU refuses
  // anything else (an O(pairs) pass); a GPU does not check (a host sync) and leaves NaN where it cannot compute.
  m.def("moe_permute(Tensor expert_ids, int num_experts, bool validate=True) -> (Tensor, Tensor)");
  // h[p] = A[e_p] x[t_p]: every pair's down-projection, (P, r).
  m.def(
      "grouped_lora_shrink(Tensor x, Tensor A, Tensor expert_ids, Tensor order, Tensor offsets) "
      "-> Tensor");
  // y[t] = sum_j gates[p] * B[e_p] h[p] over the token's pairs p = t * k + j, (T, out).
  m.def(
      "grouped_lora_expand(Tensor h, Tensor B, Tensor gates, Tensor expert_ids, Tensor order, "
      "Tensor offsets, int num_tokens) -> Tensor");
  m.def(
      "grouped_lora_shrink_backward(Tensor grad_h, Tensor x, Tensor A, Tensor expert_ids, "
      "Tensor order, Tensor offsets) -> (Tensor, Tensor)");
  m.def(
      "grouped_lora_expand_backward(Tensor grad_y, Tensor h, Tensor B, Tensor gates, "
      "Tensor expert_ids, Tensor order, Tensor offsets) -> (Tensor, Tensor, Tensor)");
  // The dense-masked path's router: hidden (T, E * r) every expert's down-projection, logits (T, E).
  // Returns gated (hidden times scaling times each expert's gate), the dense float32 gates (T, E):
  // the softmax over each token's top-k logits, zero elsewhere; and the chosen ids (T, top_k),
  // largest logit first, equal logits by lower index.
  m.def("router_gates(Tensor hidden, Tensor logits, int top_k, float scaling) -> (Tensor, Tensor, Tensor)");
  // (T, E * r + E) in hidden's dtype: d gated_input, then d logits through the gates (plus
  // grad_logits, the load-balancing loss's, when given).
  m.def(
      "router_gates_backward(Tensor grad_gated, Tensor hidden, Tensor gates, Tensor? grad_logits, "
      "float scaling) -> Tensor");
  // Serving: expert selection for tokens of several adapters routed by one GEMM against their
  // routers stacked. logits (T, M * E): each token keeps block member[t] (its adapter's router),
  // then its top-k experts (largest logit first, equal logits by lower index). Returns float32
  // gates (T, top_k): their softmax times scale[t]; ids (T, top_k): base[t] + expert.
  m.def(
      "select_experts(Tensor logits, Tensor member, Tensor scale, Tensor base, int num_experts, int top_k) "
      "-> (Tensor, Tensor)");

  // Serving: one-token (decode) attention over the paged KV cache. q (B, H, D); caches (S, Hkv, D);
  // slots (B, W): row b's context positions as cache slots; row b attends positions
  // starts[b] .. lengths[b]-1. Returns (B, H, D).
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, "
      "Tensor starts, float scale) -> Tensor");
}
