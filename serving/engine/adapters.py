"""Adapters as the engine holds them: per-module expert weights, loaded from disk on demand, LRU.

Two on-disk formats are read: this project's adapter folders (MoE-LoRA or heterogeneous-rank
LoRA with HeteroLoRA's shortcut connections, with the plan) and plain PEFT LoRA folders
(`rank_pattern` and `alpha_pattern` honoured).
Only safetensors are read.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alphalora.adapters.inject import LAYER_ROUTER_ATTRIBUTE, AdapterError
from alphalora.adapters.io import CONFIG_NAME, _load_weights, read_adapter_config
from alphalora.adapters.peft_format import (
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    PEFT_WEIGHTS_NAME,
    peft_scaling,
    read_peft_lora_config,
)
from alphalora.adapters.shortcuts import SHORTCUTS_ATTRIBUTE
from alphalora.allocation.plan import parse_shortcut
from alphalora.spectral.roles import block_index


@dataclass
class ModuleAdapter:
    """One adapted linear: E experts of rank r (E = 1 is plain LoRA)."""

    A: torch.Tensor  # (E, r, in)
    B: torch.Tensor  # (E, out, r)
    scaling: float
    top_k: int = 1
    router: torch.Tensor | None = None  # (E, in), None for a single expert or a layer's shared router
    shared_router: bool = False  # gated by its block's router (LoadedAdapter.layer_routers), not its own

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
    # modules_to_save: modules trained in full (lm_head, embed_tokens), by module name, then parameter name
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # HeteroLoRA's shortcut connections, by (block, kind): d -> d LoRA maps (`alphalora.adapters.shortcuts`)
    shortcuts: dict[tuple[int, str], ModuleAdapter] = field(default_factory=dict)
    # the shared-router option: one router (E, hidden) per block, reading the block's input, and its top-k
    layer_routers: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_LOAD_COUNTER))  # unique per load, for caches

    @property
    def kind(self) -> str:
        return "moe-lora" if any(m.num_experts > 1 for m in self.modules.values()) else "lora"

    def tensors(self) -> list[torch.Tensor]:
        experts = [t for m in self.modules.values() for t in (m.A, m.B, m.router) if t is not None]
        shortcuts = [t for m in self.shortcuts.values() for t in (m.A, m.B)]
        routers = [router for router, _ in self.layer_routers.values()]
        return experts + shortcuts + routers + [t for params in self.heads.values() for t in params.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass(frozen=True)
class ServedModel:
    """What an adapter must fit to be served: the base model's linear layers (in, out) and the
    parameter shapes of the modules the engine can swap per adapter (lm_head, embed_tokens)."""

    linears: dict[str, tuple[int, int]]
    heads: dict[str, dict[str, tuple[int, ...]]]
    hidden_size: int = 0  # of the residual stream, which shortcut connections map
    num_layers: int = 0
    projected: frozenset[str] | None = None  # the linears the engine adds adapters to (None: every one)
    model_type: str | None = None  # the base model's family: our adapters name the one they were trained on

    @classmethod
    def of(cls, model: torch.nn.Module, swappable: dict[str, torch.nn.Module],
           projected: frozenset[str] | None = None) -> ServedModel:
        linears = {name: (module.in_features, module.out_features)
                   for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        heads = {name: {p: tuple(t.shape) for p, t in module.named_parameters()} for name, module in swappable.items()}
        config = model.config
        return cls(linears, heads, config.hidden_size, config.num_hidden_layers, projected, config.model_type)

    def check(self, adapter: LoadedAdapter, trained_on: dict | None = None) -> None:
        """AdapterError naming the first module of `adapter` that this base model cannot take, or else (with
        `trained_on`, our adapter's config) the other model family it was trained on."""
        where = f"adapter {adapter.name!r} ({adapter.path})"
        for name, module in adapter.modules.items():
            if name not in self.linears:
                raise AdapterError(f"{where} adapts {name!r}, which this base model does not have as a linear "
                                   "layer: it was trained for another model; serve it with its own base model")
            if self.projected is not None and name not in self.projected:
                raise AdapterError(f"{where} adapts {name!r}, a linear layer the engine runs without adapters: it "
                                   "adds them to each block's attention and MLP projections only (a shared expert's "
                                   "too, not the LM head nor a mixture's routed experts); train the adapter on those")
            fan_in, fan_out = self.linears[name]
            reads = {module.A.shape[-1]} | (set() if module.router is None else {module.router.shape[-1]})
            if reads != {fan_in} or module.B.shape[1] != fan_out:
                raise AdapterError(f"{where}: {name!r} is {fan_in} -> {fan_out} in this base model but the adapter's "
                                   f"weights are {module.A.shape[-1]} -> {module.B.shape[1]}: it was trained for "
                                   "another model; serve it with its own base model")
        for layer, (router, _) in adapter.layer_routers.items():
            if layer >= self.num_layers or router.shape[-1] != self.hidden_size:
                raise AdapterError(f"{where}: its router of block {layer} reads width {router.shape[-1]}, but this "
                                   f"base model has {self.num_layers} blocks of width {self.hidden_size}: it was "
                                   "trained for another model; serve it with its own base model")
        for (layer, kind), module in adapter.shortcuts.items():
            widths = {module.A.shape[-1], module.B.shape[1]}
            if layer >= self.num_layers or widths != {self.hidden_size}:
                raise AdapterError(f"{where}: its shortcut layer{layer}.{kind} maps {module.A.shape[-1]} -> "
                                   f"{module.B.shape[1]} in block {layer}, but this base model has "
                                   f"{self.num_layers} blocks of width {self.hidden_size}: it was trained for another "
                                   "model; serve it with its own base model")
        for name, params in adapter.heads.items():
            if name not in self.heads:
                raise AdapterError(f"{where} trains {name!r} in full (modules_to_save); the engine swaps in only "
                                   f"{sorted(self.heads)} per adapter (a sequence-classification head does not "
                                   "generate text)")
            expected = self.heads[name]
            got = {p: tuple(t.shape) for p, t in params.items()}
            if got != expected:
                raise AdapterError(f"{where}: its {name!r} has parameters {got} but the base model's are {expected}; "
                                   "adapters that resize the vocabulary are not served")
        # Same shapes, another family (a Gemma 2 adapter on a Gemma 3 of the same sizes): its modules would fit and
        # compute nonsense. (Other config values may differ, as a longer context does: served as they are.)
        trained_type = ((trained_on or {}).get("base_config") or {}).get("model_type")
        if trained_type is not None and self.model_type is not None and trained_type != self.model_type:
            raise AdapterError(f"{where} was trained on a {trained_type!r} model ({trained_on['base_model']!r}), "
                               f"not a {self.model_type!r} one like this base model; serve it with the base model "
                               "it was trained with")


@dataclass
class _AdapterParts:
    """What an adapter folder holds, in engine form (PEFT's have only modules and heads)."""

    modules: dict[str, ModuleAdapter]
    heads: dict[str, dict[str, torch.Tensor]]
    shortcuts: dict[tuple[int, str], ModuleAdapter] = field(default_factory=dict)
    layer_routers: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)
    config: dict | None = None  # our adapter's config (PEFT's carry none that names the base architecture)


def _tensor(tensors: dict[str, torch.Tensor], key: str, folder: Path) -> torch.Tensor:
    if key not in tensors:
        raise AdapterError(f"{folder}: the weights hold no {key!r}, which its config names; the adapter is "
                           "incomplete: save or export it again")
    return tensors[key]


def _check_shapes(name: str, folder: Path, A: torch.Tensor, B: torch.Tensor, router: torch.Tensor | None = None):
    """A module's experts as the engine stacks them: A (E, r, in), B (E, out, r), router (E, in)."""
    consistent = (A.dim() == 3 and B.dim() == 3 and A.shape[0] == B.shape[0] and A.shape[1] == B.shape[2]
                  and A.shape[0] >= 1 and A.shape[1] >= 1
                  and (router is None or tuple(router.shape) == (A.shape[0], A.shape[2])))
    if not consistent:
        routed = "" if router is None else f", router {tuple(router.shape)}"
        raise AdapterError(f"{folder}: {name!r} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}{routed}, which "
                           "are not E >= 1 experts of one rank r >= 1 (A: E x r x in, B: E x out x r); the file is "
                           "damaged or was not written by alphalora")


def _check_finite(adapter: LoadedAdapter) -> None:
    """AdapterError naming the first scale, or weight in the served dtype, that is NaN or infinite: served, it would
    give every sequence on the adapter NaN logits. Checked where the weights now are, read back in one transfer."""
    modules = [*adapter.modules.items(), *((f"shortcut layer{layer}.{kind}", m) for (layer, kind), m in
                                           adapter.shortcuts.items())]
    for name, module in modules:
        if not math.isfinite(module.scaling):
            raise AdapterError(f"{adapter.path}: {name} scales its update by {module.scaling}; its config's alpha "
                               "must be a finite number")
    named = [(f"{name}.{part}", t) for name, m in modules
             for part, t in (("lora_A", m.A), ("lora_B", m.B), ("router", m.router)) if t is not None]
    named += [(f"block {layer} router", router) for layer, (router, _) in adapter.layer_routers.items()]
    named += [(f"{head}.{param}", t) for head, params in adapter.heads.items() for param, t in params.items()]
    named = [(name, t) for name, t in named if t.is_floating_point()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    for (name, tensor), ok in zip(named, finite, strict=True):
        if not ok:
            raise AdapterError(f"{adapter.path}: {name} holds NaN or infinite values in {tensor.dtype} (a training run "
                               "that diverged, a damaged file, or weights beyond the served dtype's range); it is not "
                               "served: load a checkpoint from before the divergence")


def _load_own(folder: Path) -> _AdapterParts:
    config = read_adapter_config(folder)
    plan = config["plan"]
    if plan.get("router", {}).get("renormalize") is False:
        raise AdapterError(f"{folder} was trained with un-renormalised router gates (router.renormalize false), "
                           "which the engine does not serve: its expert kernels renormalise the top-k gates")
    tensors = _load_weights(folder, config)
    modules = {}
    switched_off = set(plan.get("disabled_modules", []))  # a dynamic HeteroLoRA checkpoint: serve what is on
    for name in (n for n in config["module_names"] if n not in switched_off):
        layer = block_index(name)
        A, B = _tensor(tensors, f"{name}.lora_A", folder), _tensor(tensors, f"{name}.lora_B", folder)
        router = tensors.get(f"{name}.router.weight")
        _check_shapes(name, folder, A, B, router)
        modules[name] = ModuleAdapter(A=A, B=B, scaling=plan["lora_alpha"] / A.shape[1],
                                      top_k=plan["top_k_per_layer"][layer], router=router)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for head in plan.get("modules_to_save", []):
        heads[head] = {key[len(head) + 1:]: value for key, value in tensors.items() if key.startswith(f"{head}.")}
    layer_routers = _load_layer_routers(folder, plan, tensors) if plan.get("router", {}).get("type") == "shared" else {}
    for name, module in modules.items():
        module.shared_router = block_index(name) in layer_routers
    return _AdapterParts(modules, heads, _load_shortcuts(folder, plan, tensors, switched_off), layer_routers, config)


def _load_layer_routers(folder: Path, plan: dict,
                        tensors: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, int]]:
    """The shared-router option's one router per block with several experts, stored as `alphalora_router`."""
    routers = {}
    for layer, experts in enumerate(plan["experts_per_layer"]):
        if experts < 2:
            continue
        suffix = f".{LAYER_ROUTER_ATTRIBUTE}.weight"
        keys = [key for key in tensors if key.endswith(suffix) and block_index(key) == layer]
        if len(keys) != 1:
            raise AdapterError(f"{folder}: the plan shares one router per block, but the weights hold no (or several) "
                               f"router for block {layer}; the adapter is incomplete")
        routers[layer] = (tensors[keys[0]], plan["top_k_per_layer"][layer])
    return routers


def _load_shortcuts(folder: Path, plan: dict, tensors: dict[str, torch.Tensor],
                    switched_off: set[str]) -> dict[tuple[int, str], ModuleAdapter]:
    """The plan's switched-on shortcut connections, stored under each block's `alphalora_shortcuts`."""
    shortcuts = {}
    for name in plan.get("shortcuts", {}):
        if name in switched_off:
            continue
        layer, kind = parse_shortcut(name)
        suffix = f".{SHORTCUTS_ATTRIBUTE}.{kind}.lora_A"
        keys = [key for key in tensors if key.endswith(suffix) and block_index(key) == layer]
        if len(keys) != 1:
            raise AdapterError(f"{folder}: the plan names shortcut {name} but the weights hold no (or several) "
                               f"*{suffix} for block {layer}; the adapter is incomplete")
        A, B = tensors[keys[0]], _tensor(tensors, keys[0].removesuffix("lora_A") + "lora_B", folder)
        _check_shapes(name, folder, A, B)
        shortcuts[(layer, kind)] = ModuleAdapter(A=A, B=B, scaling=plan["shortcut_alpha"] / A.shape[1])
    return shortcuts


def _load_peft(folder: Path) -> _AdapterParts:
    config = read_peft_lora_config(folder)
    from safetensors.torch import load_file

    weights = folder / PEFT_WEIGHTS_NAME
    try:
        tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in load_file(str(weights)).items()}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
        raise AdapterError(f"{weights} is corrupt: {error}") from error
    modules, heads = {}, {}
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            b = tensors.get(f"{name}.lora_B.weight")
            if b is None:
                raise AdapterError(f"{weights} has {key} but no {name}.lora_B.weight; re-save the adapter")
            _check_shapes(name, folder, value[None], b[None])
            modules[name] = ModuleAdapter(A=value[None], B=b[None], scaling=peft_scaling(config, name, value.shape[0]))
        elif ".lora_" in key:
            if not key.endswith(".lora_B.weight"):
                raise AdapterError(f"{weights} holds {key}: LoRA on embedding or convolution layers is not served")
        else:  # modules_to_save: a module trained in full
            module, _, param = key.rpartition(".")
            heads.setdefault(module, {})[param] = value
    if not modules and not heads:
        raise AdapterError(f"{weights} holds no LoRA weights")
    return _AdapterParts(modules, heads)


def load_serving_adapter(name: str, path: str | Path, dtype: torch.dtype, device,
                         fits: ServedModel | None = None) -> LoadedAdapter:
    """Reads an adapter folder (ours or PEFT's) into engine form, checked against the served model."""
    folder = Path(path)
    if (folder / CONFIG_NAME).exists():
        parts = _load_own(folder)
    elif (folder / PEFT_CONFIG_NAME).exists():
        parts = _load_peft(folder)
    else:
        raise AdapterError(f"{folder} is neither an alphalora nor a PEFT adapter folder")
    modules, heads, shortcuts = parts.modules, parts.heads, parts.shortcuts
    adapter = LoadedAdapter(name, folder, modules, heads, shortcuts, parts.layer_routers)
    if fits is not None:
        fits.check(adapter, parts.config)  # before any copy to the device
    adapter.layer_routers = {layer: (router.to(device, dtype), top_k)
                             for layer, (router, top_k) in parts.layer_routers.items()}
    for module in [*modules.values(), *shortcuts.values()]:
        module.A = module.A.to(device, dtype)
        module.B = module.B.to(device, dtype)
        if module.router is not None:
            module.router = module.router.to(device, dtype)
    adapter.heads = {head: {p: t.to(device, dtype) for p, t in params.items()} for head, params in heads.items()}
    _check_finite(adapter)
    return adapter


RETIRED_MARK = "#retired"  # an unloaded adapter's weights go on under "<name>#retired<n>" for its sequences


def registered_name(name: str) -> str:
    """The name an adapter was registered under, a retired one's included."""
    return name.partition(RETIRED_MARK)[0]


class AdapterRegistry:
    """Known adapters by name; at most `max_loras` resident, least recently used evicted.

    An adapter unloaded while sequences still use it is retired: its name is free at once (new requests
    for it are refused, or reach a new adapter of that name), and its weights stay, under a name of
    their own and outside the LRU (never evicted, so never read again from a folder that may have changed
    since: a load_inplace replacement, say), until the engine drops them after its last sequence.
    """

    def __init__(self, max_loras: int, dtype: torch.dtype, device, fits: ServedModel | None = None):
        self.max_loras = max_loras
        self.dtype, self.device = dtype, device
        self.fits = fits  # adapters are checked against the served model as they load
        self.paths: dict[str, Path] = {}  # what the server lists: registered and not unloaded
        self.retired: dict[str, Path] = {}  # unloaded but still in use, by their retired names
        self._resident: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._retired_weights: dict[str, LoadedAdapter] = {}  # the retired ones' weights, pinned
        self._registrations = itertools.count()
        self._cache_keys: dict[str, str] = {}

    def register(self, name: str, path: str | Path, load_now: bool = False,
                 loaded: LoadedAdapter | None = None) -> None:
        """Registers the adapter folder at `path` under `name`; `load_now` loads it at once, unless `loaded`
        holds its weights already (read by the caller, e.g. to check a replacement before the old one goes)."""
        self.check_name(name)
        self.paths[name] = Path(path)
        self._resident.pop(name, None)  # registered again: the new folder from now on
        self._cache_keys[name] = f"{name}#{next(self._registrations)}"
        if loaded is not None:
            self._make_resident(name, loaded)
        elif load_now:
            self.get(name)

    @staticmethod
    def check_name(name: str) -> None:
        """AdapterError for a name the registry keeps for itself: retired adapters' names."""
        if RETIRED_MARK in name:
            raise AdapterError(f"adapter name {name!r} contains {RETIRED_MARK!r}, which names adapters unloaded while "
                               "requests still use them; choose another name")

    def unregister(self, name: str) -> None:
        self.paths.pop(name, None)
        self.retired.pop(name, None)
        self._resident.pop(name, None)
        self._retired_weights.pop(name, None)
        self._cache_keys.pop(name, None)

    def retire(self, name: str) -> str:
        """Takes `name` off the list, keeping its weights under a new name (returned) for the sequences
        that use them: pinned now (read from its folder first where the LRU had evicted them)."""
        retired = f"{name}{RETIRED_MARK}{next(self._registrations)}"
        adapter = self._resident.pop(name, None)
        if adapter is None:
            try:
                adapter = self.load(retired, self.paths[name])
            except AdapterError:
                adapter = None  # its folder is gone or broken: its sequences fail when they next run, as before
        self.retired[retired] = self.paths.pop(name)
        self._cache_keys[retired] = self._cache_keys.pop(name)
        if adapter is not None:
            self._retired_weights[retired] = adapter
        return retired

    def cache_key(self, name: str) -> str:
        """What tells this registration's cached KV blocks from any other's (another adapter, or the
        same name registered again, perhaps with other weights); stable across LRU reloads."""
        return self._cache_keys[name]

    def check(self, name: str) -> None:
        """AdapterError unless `name` can be served: it is registered, and loads (tried now where that
        evicts no resident adapter; each was loaded once when registered at run time or start-up)."""
        if name in self._resident or name in self._retired_weights:
            return
        if name not in self.paths and name not in self.retired:
            raise AdapterError(f"unknown adapter {name!r}")
        if len(self._resident) < self.max_loras:
            self.get(name)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter's weights, loading it (and evicting the least recently used) if needed."""
        if name in self._retired_weights:
            return self._retired_weights[name]
        if name in self._resident:
            self._resident.move_to_end(name)
            return self._resident[name]
        path = self.paths.get(name) or self.retired.get(name)
        if path is None:
            raise AdapterError(f"unknown adapter {name!r}")
        adapter = self.load(name, path)
        self._make_resident(name, adapter)
        return adapter

    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        """The weights of the adapter folder at `path`, read and checked against the served model, as `name`
        would be served (not registered)."""
        return load_serving_adapter(name, path, self.dtype, self.device, self.fits)

    def _make_resident(self, name: str, adapter: LoadedAdapter) -> None:
        self._resident[name] = adapter
        while len(self._resident) > self.max_loras:
            self._resident.popitem(last=False)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)
