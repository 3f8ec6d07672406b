"""Loads the compiled op library, or registers the pure-PyTorch references in its place."""

from __future__ import annotations

import warnings

import torch

from . import reference

_SCHEMAS = {
    "powerlaw_fit": (
        "powerlaw_fit(Tensor evals, Tensor lengths, Tensor cand_lo, Tensor cand_hi, "
        "int min_tail, bool bias_corrected) -> (Tensor, Tensor, Tensor)",
        reference.powerlaw_fit,
    ),
    "eigvalsh_batched": ("eigvalsh_batched(Tensor grams) -> Tensor", reference.eigvalsh_batched),
    "moe_permute": (
        "moe_permute(Tensor expert_ids, int num_experts, bool validate=True) -> (Tensor, Tensor)",
        reference.moe_permute,
    ),
    "grouped_lora_shrink": (
        "grouped_lora_shrink(Tensor x, Tensor A, Tensor expert_ids, Tensor order, Tensor offsets) -> Tensor",
        reference.grouped_lora_shrink,
    ),
    "grouped_lora_expand": (
        "grouped_lora_expand(Tensor h, Tensor B, Tensor gates, Tensor expert_ids, Tensor order, "
        "Tensor offsets, int num_tokens) -> Tensor",
        reference.grouped_lora_expand,
    ),
    "grouped_lora_shrink_backward": (
        "grouped_lora_shrink_backward(Tensor grad_h, Tensor x, Tensor A, Tensor expert_ids, Tensor order, "
        "Tensor offsets) -> (Tensor, Tensor)",
        reference.grouped_lora_shrink_backward,
    ),
    "grouped_lora_expand_backward": (
        "grouped_lora_expand_backward(Tensor grad_y, Tensor h, Tensor B, Tensor gates, Tensor expert_ids, "
        "Tensor order, Tensor offsets) -> (Tensor, Tensor, Tensor)",
        reference.grouped_lora_expand_backward,
    ),
    "router_gates": (
        "router_gates(Tensor hidden, Tensor logits, int top_k, float scaling) -> (Tensor, Tensor, Tensor)",
        reference.router_gates,
    ),
    "router_gates_backward": (
        "router_gates_backward(Tensor grad_gated, Tensor hidden, Tensor gates, Tensor? grad_logits, "
        "float scaling) -> Tensor",
        reference.router_gates_backward,
    ),
    "select_experts": (
        "select_experts(Tensor logits, Tensor member, Tensor scale, Tensor base, int num_experts, int top_k) "
        "-> (Tensor, Tensor)",
        reference.select_experts,
    ),
    "paged_decode_attention": (
        "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lengths, "
        "Tensor starts, float scale) -> Tensor",
        reference.paged_decode_attention,
    ),
    "xmin_peak_window": (
        "xmin_peak_window(Tensor evals, Tensor lengths, int bins, bool log_lower_bound) "
        "-> (Tensor, Tensor)",
        reference.xmin_peak_window,
    ),
}


def _load_compiled() -> bool:
    try:
        from alphalora import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
    except ImportError as error:
        warnings.warn(
            f"alphalora's compiled kernels could not be loaded ({error}); using the pure-PyTorch "
            "reference ops, which give the same results more slowly. Rebuild with "
            "`pip install --no-build-isolation .` to get the kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _register_references() -> None:
    """Defines every schema in Python and backs it with its reference implementation."""
    global _fallback_library
    _fallback_library = torch.library.Library("alphalora", "DEF")
    for name, (schema, implementation) in _SCHEMAS.items():
        _fallback_library.define(schema)
        _fallback_library.impl(name, implementation, "CompositeExplicitAutograd")


_fallback_library = None
HAS_COMPILED_OPS = _load_compiled()
if not HAS_COMPILED_OPS:
    _register_references()
