"""Mixture-of-LoRA-experts and heterogeneous-rank LoRA layers, and their injection into models."""

from .inject import AdapterError, AdapterState, adapter_parameters, adapter_state, inject_adapters
from .layer import MoELoRALinear, moe_lora_loop_reference

__all__ = [
    "AdapterError",
    "AdapterState",
    "MoELoRALinear",
    "adapter_parameters",
    "adapter_state",
    "inject_adapters",
    "moe_lora_loop_reference",
]
