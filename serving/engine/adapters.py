"""Adapters as the engine holds them: per-module expert weights, loaded from disk on demand, LRU.

Two on-disk formats are read: this project's adapter folders (MoE-LoRA or heterogeneous-rank
LoRA, with the plan) and plain PEFT LoRA folders (`rank_pattern` and `alpha_pattern` honoured).
Only safetensors are read.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alphalora.adapters.inject import AdapterError
from alphalora.adapters.io import CONFIG_NAME, _load_weights, read_adapter_config
from alphalora.adapters.peft_export import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from alphalora.spectral.roles import block_index


@dataclass
class ModuleAdapter:
    """One adapted linear: E experts of rank r (E = 1 is plain LoRA)."""

    A: torch.Tensor  # (E, r, in)
    B: torch.Tensor  # (E, out, r)
    scaling: float
    top_k: int = 1
    router: torch.Tensor | None = None  # (E, in), None for a single expert

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]


_LOAD_COUNTER = itertools.count()


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    modules: dict[str, ModuleAdapter]  # by the base model's module name
    uid: int = field(default_factory=lambda: next(_LOAD_COUNTER))  # unique per load, for caches

    @property
    def kind(self) -> str:
        return "moe-lora" if any(m.num_experts > 1 for m in self.modules.values()) else "lora"

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values()
                   for t in (m.A, m.B, m.router) if t is not None)


def _match_pattern(pattern: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (its get_pattern_key): the first key that is the
    module name or a dotted suffix of it, keys read as regular expressions."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_scaling(config: dict, name: str, rank: int) -> float:
    """The scale PEFT gives module `name` of rank `rank`: its alpha (alpha_pattern first) over r,
    or over sqrt(r) for rsLoRA."""
    alpha = _match_pattern(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _load_own(folder: Path) -> dict[str, ModuleAdapter]:
    config = read_adapter_config(folder)
    plan = config["plan"]
    if plan.get("router", {}).get("type") == "shared":
        raise AdapterError(f"{folder}: shared-router adapters are not served yet; use per-module routers")
    if plan.get("shortcuts"):
        raise AdapterError(f"{folder} has LoRA shortcut connections, which the serving engine does not run; "
                           "use it from Python (`alphalora.adapters.load_adapter`) or allocate without --shortcuts")
    tensors = _load_weights(folder)
    modules = {}
    switched_off = set(plan.get("disabled_modules", []))  # a dynamic HeteroLoRA checkpoint: serve what is on
    for name in (n for n in config["module_names"] if n not in switched_off):
        layer = block_index(name)
        A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        modules[name] = ModuleAdapter(A=A, B=B, scaling=plan["lora_alpha"] / A.shape[1],
                                      top_k=plan["top_k_per_layer"][layer], router=tensors.get(f"{name}.router.weight"))
    return modules


def _load_peft(folder: Path) -> dict[str, ModuleAdapter]:
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: only PEFT LoRA adapters are served, not {config.get('peft_type')}")
    if config.get("use_dora") or config.get("modules_to_save"):
        raise AdapterError(f"{folder}: DoRA and modules_to_save are not supported for serving")
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.exists():
        raise AdapterError(f"{folder} has no {PEFT_WEIGHTS_NAME} (pickled .bin weights are refused)")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterError(f"{weights} is corrupt: {error}") from error
    modules = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = tensors[key.replace("lora_A", "lora_B")]
        modules[name] = ModuleAdapter(A=a[None], B=b[None], scaling=peft_scaling(config, name, a.shape[0]))
    if not modules:
        raise AdapterError(f"{weights} holds no LoRA weights")
    return modules


def load_serving_adapter(name: str, path: str | Path, dtype: torch.dtype, device) -> LoadedAdapter:
    """Reads an adapter folder (ours or PEFT's) into engine form."""
    folder = Path(path)
    if (folder / CONFIG_NAME).exists():
        modules = _load_own(folder)
    elif (folder / PEFT_CONFIG_NAME).exists():
        modules = _load_peft(folder)
    else:
        raise AdapterError(f"{folder} is neither an alphalora nor a PEFT adapter folder")
    for module in modules.values():
        module.A = module.A.to(device, dtype)
        module.B = module.B.to(device, dtype)
        if module.router is not None:
            module.router = module.router.to(device, dtype)
    return LoadedAdapter(name, folder, modules)


class AdapterRegistry:
    """Known adapters by name; at most `max_loras` resident, least recently used evicted."""

    def __init__(self, max_loras: int, dtype: torch.dtype, device):
        self.max_loras = max_loras
        self.dtype, self.device = dtype, device
        self.paths: dict[str, Path] = {}
        self._resident: OrderedDict[str, LoadedAdapter] = OrderedDict()

    def register(self, name: str, path: str | Path, load_now: bool = False) -> None:
        self.paths[name] = Path(path)
        if load_now:
            self.get(name)

    def unregister(self, name: str) -> None:
        self.paths.pop(name, None)
        self._resident.pop(name, None)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter's weights, loading it (and evicting the least recently used) if needed."""
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name]
        if name not in self.paths:
            raise AdapterError(f"unknown adapter {name!r}")
        adapter = load_serving_adapter(name, self.paths[name], self.dtype, self.device)
        self._resident[name] = adapter
        while len(self._resident) > self.max_loras:
            self._resident.popitem(last=False)
        return adapter

    @property
    def resident(self) -> list[str]:
        return list(self._resident)
