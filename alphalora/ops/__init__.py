"""alphalora's custom ops: typed wrappers over torch.ops.alphalora.* with fake kernels."""

from ._library import HAS_COMPILED_OPS
from .attention import paged_decode_attention
from .routing import (
    grouped_lora_expand,
    grouped_lora_shrink,
    moe_lora,
    moe_permute,
    router_gates,
    router_gates_backward,
    select_experts,
)
from .spectral import eigvalsh_batched, powerlaw_fit, xmin_peak_window

__all__ = [
    "HAS_COMPILED_OPS",
    "eigvalsh_batched",
    "grouped_lora_expand",
    "grouped_lora_shrink",
    "moe_lora",
    "moe_permute",
    "paged_decode_attention",
    "router_gates",
    "router_gates_backward",
    "select_experts",
    "powerlaw_fit", "xmin_peak_window"]
