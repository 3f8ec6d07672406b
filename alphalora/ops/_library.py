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


def _register_references(schemas: dict[str, tuple[str, object]], kind: str = "DEF") -> torch.library.Library:
    """Defines these schemas in Python and backs each with its reference implementation ("DEF": the
    whole library; "FRAGMENT": ops added to a loaded one)."""
    library = torch.library.Library("alphalora", kind)
    for name, (schema, implementation) in schemas.items():
        library.define(schema)
        library.impl(name, implementation, "CompositeExplicitAutograd")
    return library


def _fill_missing_ops(schemas: dict[str, tuple[str, object]]) -> torch.library.Library | None:
    """A compiled library built from older sources (an editable install not rebuilt after a pull)
    lacks the newer ops: those get their references, with one warning saying how to rebuild."""
    missing = {name: entry for name, entry in schemas.items() if not hasattr(torch.ops.alphalora, name)}
    if not missing:
        return None
    warnings.warn(
        f"alphalora's compiled kernels are older than its Python code: they lack {', '.join(sorted(missing))}, "
        "which run as pure-PyTorch reference ops (same results, more slowly). Rebuild with "
        "`pip install --no-build-isolation .` (or `-e .` for an editable install) to get their kernels.",
        RuntimeWarning,
        stacklevel=3,
    )
    return _register_references(missing, "FRAGMENT")


def _fill_missing_cuda_kernels(schemas: dict[str, tuple[str, object]],
                               namespace: str = "alphalora") -> torch.library.Library | None:
    """Ops of the compiled library without a CUDA kernel run their references on CUDA tensors. That means the
    library was built without CUDA (no CUDA_HOME at install on a GPU machine): said once, with how to rebuild,
    instead of failing at the first op on the GPU."""
    def has_cuda_kernel(name: str) -> bool:
        qualified = f"{namespace}::{name}"
        return any(torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)
                   for key in ("CUDA", "CompositeExplicitAutograd", "CompositeImplicitAutograd"))

    without = [name for name in schemas if not has_cuda_kernel(name)]
    if not without:
        return None
    if torch.backends.cuda.is_built():
        warnings.warn(
            f"alphalora's compiled kernels were built without CUDA: {', '.join(without)} run as pure-PyTorch "
            "reference ops on the GPU (same results, more slowly). Rebuild with CUDA: set CUDA_HOME to the CUDA "
            "toolkit (nvcc) and `ALPHALORA_CUDA=1 pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    library = torch.library.Library(namespace, "IMPL")
    for name in without:
        library.impl(name, schemas[name][1], "CUDA")
    return library


HAS_COMPILED_OPS = _load_compiled()
# Kept alive for as long as the registrations are needed: the whole process.
_python_library = _fill_missing_ops(_SCHEMAS) if HAS_COMPILED_OPS else _register_references(_SCHEMAS)
_cuda_fallbacks = _fill_missing_cuda_kernels(_SCHEMAS) if HAS_COMPILED_OPS else None
