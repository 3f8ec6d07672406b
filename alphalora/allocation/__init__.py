"""Adapter plans: AlphaLoRA (alpha^beta), MoLA presets and uniform expert allocations."""

from .allocate import allocate
from .expert_counts import AllocationError, alpha_power_counts, group_counts, largest_remainder
from .plan import Plan, PlanFormatError, RouterSettings

__all__ = [
    "AllocationError",
    "Plan",
    "PlanFormatError",
    "RouterSettings",
    "allocate",
    "alpha_power_counts",
    "group_counts",
    "largest_remainder",
]
