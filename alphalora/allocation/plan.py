"""The adapter plan: how many LoRA experts each layer gets, where, at which rank. JSON on disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alphalora._io import check_format_version, read_json, write_text_atomic

FORMAT_VERSION = 1
METHODS = ("alphalora", "mola", "uniform")
DEFAULT_TARGET_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
ROUTER_TYPES = ("per_module", "shared")


class PlanFormatError(ValueError):
    """A plan that is not valid: the message names the field and the fix."""


@dataclass
class RouterSettings:
    """Token-level softmax top-k routers (MoLA): one per adapted module, or one shared per layer."""

    type: str = "per_module"
    aux_loss_coef: float = 0.0  # Switch-style load balancing; MoLA's paper runs use 0.001
    renormalize: bool = True  # top-k gates rescaled to sum to 1


@dataclass
class Plan:
    """An adapter plan, produced by `allocate` and consumed by training."""

    method: str
    base_model: str
    experts_per_layer: list[int]
    top_k_per_layer: list[int]
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    rank: int = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)  # role, name or glob -> rank (heterogeneous LoRA)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    router: RouterSettings = field(default_factory=RouterSettings)
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, e.g. a classifier head
    source: dict[str, Any] = field(default_factory=dict)  # how the counts were derived

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterSettings(**self.router)
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.experts_per_layer)

    @property
    def total_experts(self) -> int:
        return sum(self.experts_per_layer)

    def validate(self) -> None:
        """Raises PlanFormatError naming the first problem."""
        def fail(message: str) -> None:
            raise PlanFormatError(f"invalid plan: {message}")

        if self.method not in METHODS:
            fail(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        counts, top_k = self.experts_per_layer, self.top_k_per_layer
        if not isinstance(counts, list) or not counts or not all(isinstance(n, int) and n >= 1 for n in counts):
            fail(f"experts_per_layer must be a non-empty list of integers >= 1, got {counts!r}")
        if not isinstance(top_k, list) or len(top_k) != len(counts):
            fail(f"top_k_per_layer must have one entry per layer ({len(counts)}), got {top_k!r}")
        for layer, (n, k) in enumerate(zip(counts, top_k, strict=True)):
            if not isinstance(k, int) or not 1 <= k <= n:
                fail(f"layer {layer}: top_k {k!r} must be between 1 and its {n} experts")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            fail(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if not isinstance(self.rank, int) or self.rank < 1:
            fail(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.rank_pattern, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 1 for k, v in self.rank_pattern.items()
        ):
            fail(f"rank_pattern must map module roles/names to positive integers, got {self.rank_pattern!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            fail(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            fail(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.router.type not in ROUTER_TYPES:
            fail(f"router.type {self.router.type!r} is not one of {', '.join(ROUTER_TYPES)}")
        if self.router.aux_loss_coef < 0:
            fail(f"router.aux_loss_coef must be >= 0, got {self.router.aux_loss_coef}")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        check_format_version(data, FORMAT_VERSION, "plan", "`alphalora allocate`", PlanFormatError)
        fields = {k: v for k, v in data.items() if k != "format_version"}
        try:
            return cls(**fields)
        except TypeError as error:
            raise PlanFormatError(f"invalid plan: {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(read_json(path, "plan", "`alphalora allocate`", PlanFormatError))
