"""Building a plan into a transformers model: MoE-LoRA layers on the targeted linears."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from alphalora.allocation.plan import Plan
from alphalora.spectral.roles import block_index, role_of

from .layer import MoELoRALinear
from .routing import BalanceStatistics, dense_gates, top_k_gates
from .shortcuts import ShortcutError, ShortcutLoRA, attach_shortcuts

ADAPTER_ATTRIBUTE = "alphalora_adapter"
# Sequence-classification heads of transformers models, trained in full beside the adapter.
CLASSIFIER_HEADS = ("classifier", "score")


LAYER_ROUTER_ATTRIBUTE = "alphalora_router"  # a block's shared router (the shared-router option)


class AdapterError(ValueError):
    """A plan that does not fit the model, or an adapter that cannot be built or loaded."""


class SharedRouter(nn.Module):
    """One router per block (the shared-router option): gates from the block's input tokens."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, like: torch.Tensor, renormalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.top_k = top_k
        self.num_experts = num_experts
        self.renormalize = renormalize
        self.modules_to_feed: list[MoELoRALinear] = []
        self.balance: BalanceStatistics | None = None

    def route(self, hidden: torch.Tensor) -> None:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        logits = tokens @ self.weight.T.to(tokens.dtype)  # (float32 over a half-precision model: adapter_dtype)
        gates, ids = top_k_gates(logits, self.top_k, self.renormalize)
        if self.balance is not None and self.training:
            self.balance.add(logits, ids)
        dense = dense_gates(gates, ids, self.num_experts)
        for module in self.modules_to_feed:
            module.shared_gates = dense


@dataclass
class AdapterState:
    """What injection added to a model: the plan, the adapted module names, the balance stats."""

    plan: Plan
    module_names: list[str]
    balance: dict[int, BalanceStatistics] = field(default_factory=dict)
    shortcuts: dict[str, ShortcutLoRA] = field(default_factory=dict)  # HeteroLoRA shortcut connections

    def switchable_modules(self, model: nn.Module) -> dict[str, MoELoRALinear | ShortcutLoRA]:
        """Every adapted module and shortcut by plan name: what HeteroLoRA turns on and off."""
        modules: dict[str, MoELoRALinear | ShortcutLoRA] = {n: model.get_submodule(n) for n in self.module_names}
        return {**modules, **self.shortcuts}

    def set_disabled(self, model: nn.Module, disabled: list[str]) -> None:
        """Switches off exactly `disabled` (they keep their weights) and records it in the plan."""
        modules = self.switchable_modules(model)
        unknown = sorted(set(disabled) - set(modules))
        if unknown:
            raise AdapterError(f"disabled_modules {unknown[:3]} are not adapted modules or shortcuts of this adapter")
        for name, module in modules.items():
            module.enabled = name not in disabled
        self.plan = dataclasses.replace(self.plan, disabled_modules=sorted(disabled))

    def aux_loss(self) -> torch.Tensor | None:
        """Sum over layers of E_l * sum_i f_i P_i since the last call (MoLA); resets the statistics.
        None when nothing was routed, or when the plan's aux_loss_coef is 0 (no statistics are kept)."""
        losses = [stats.loss() for stats in self.balance.values()]
        self.reset_statistics()
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def reset_statistics(self) -> None:
        for stats in self.balance.values():
            stats.reset()


def _reset_routing_statistics(model: nn.Module, _args) -> None:
    """Each forward of the model starts the routing statistics afresh. Activation checkpointing
    re-runs the blocks' forwards during backward, after the aux loss was read: without this, those
    re-runs would leak into the next step's aux loss (and its freed graph)."""
    adapter_state(model).reset_statistics()


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, target: str) -> bool:
    if any(c in target for c in "*?["):
        return fnmatch.fnmatchcase(name, target)
    return role_of(name) == target or name == target or name.endswith("." + target)


def _block_prefix(name: str, layer: int) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i + 1] == str(layer) and parts[i] in {"layers", "layer", "h", "blocks", "block"}:
            return ".".join(parts[: i + 2])
    raise AdapterError(f"cannot find the block of {name}")


def candidate_modules(model: nn.Module) -> dict[str, tuple[int, nn.Module]]:
    """Adaptable linears inside transformer blocks: name -> (block index, module)."""
    found = {}
    for name, module in model.named_modules():
        layer = block_index(name)
        if layer is not None and _is_adaptable(module):
            found[name] = (layer, module)
    return found


def module_rank(plan: Plan, name: str) -> int:
    """The rank of module `name`: the first rank_pattern entry that matches it, else plan.rank."""
    return next((r for target, r in plan.rank_pattern.items() if _matches(name, target)), plan.rank)


def inject_adapters(model: nn.Module, plan: Plan) -> AdapterState:
    """Replaces the plan's target linears with MoE-LoRA layers and freezes everything else.

    Targets are roles (q, k, v, o, gate, up, down, ...), module names or suffixes, or glob
    patterns over full names. Layer l gets plan.experts_per_layer[l] experts, top-k
    plan.top_k_per_layer[l]. Raises AdapterError if the plan does not fit the model.
    """
    if getattr(model, ADAPTER_ATTRIBUTE, None) is not None:
        raise AdapterError("this model already has alphalora adapters; load a fresh base model")
    candidates = candidate_modules(model)
    if not candidates:
        raise AdapterError(f"no adaptable linear layers inside transformer blocks of {type(model).__name__}")
    num_blocks = max(layer for layer, _ in candidates.values()) + 1
    if plan.num_layers != num_blocks:
        raise AdapterError(
            f"the plan has {plan.num_layers} layers but the model has {num_blocks} blocks; "
            "make a plan for this model (`alphalora allocate --report` on its analysis)"
        )
    chosen = {name: entry for name, entry in candidates.items()
              if any(_matches(name, target) for target in plan.target_modules)}
    unmatched = [t for t in plan.target_modules if not any(_matches(n, t) for n in candidates)]
    if unmatched:
        roles = sorted({role_of(n) for n in candidates})
        raise AdapterError(f"target modules {unmatched} match nothing in this model; its roles are {roles}")

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    shared = plan.router.type == "shared"
    state = AdapterState(plan=plan, module_names=sorted(chosen, key=lambda n: (chosen[n][0], n)))
    by_block: dict[int, list[MoELoRALinear]] = defaultdict(list)
    for name in state.module_names:
        layer, base = chosen[name]
        experts, top_k = plan.experts_per_layer[layer], plan.top_k_per_layer[layer]
        rank = module_rank(plan, name)
        adapted = MoELoRALinear(base, experts, top_k, rank, plan.lora_alpha, plan.lora_dropout,
                                own_router=not shared, renormalize=plan.router.renormalize)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, adapted)
        by_block[layer].append(adapted)
    for name in plan.modules_to_save:
        try:
            head = model.get_submodule(name)
        except AttributeError as error:
            raise AdapterError(f"modules_to_save entry {name!r} is not a module of this model") from error
        own = {id(parameter) for parameter in head.parameters()}
        tied = [other for other, parameter in model.named_parameters(remove_duplicate=False)
                if id(parameter) in own and not other.startswith(f"{name}.")]
        if tied:
            raise AdapterError(f"modules_to_save entry {name!r} shares its weights with {tied[0]!r} (tied "
                               "embeddings): training it would change the base model too; untie them "
                               "(tie_word_embeddings=False) or leave it out of modules_to_save")
        for parameter in head.parameters():
            parameter.requires_grad_(True)
    if plan.shortcuts:
        blocks = {layer: model.get_submodule(_block_prefix(name, layer)) for name, (layer, _) in candidates.items()}
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None) or modules_hidden(candidates)
        try:
            state.shortcuts = attach_shortcuts(model, blocks, plan.shortcuts, plan.shortcut_alpha, hidden_size)
        except ShortcutError as error:
            raise AdapterError(str(error)) from error
    if plan.disabled_modules:
        state.set_disabled(model, plan.disabled_modules)
    for layer, modules in by_block.items():
        # Routing statistics cost a softmax and a count per module and step: gathered only when
        # the load-balancing loss is trained on.
        stats = BalanceStatistics(plan.experts_per_layer[layer]) if plan.router.aux_loss_coef > 0 else None
        if stats is not None:
            state.balance[layer] = stats
        if shared and plan.experts_per_layer[layer] > 1:
            _attach_shared_router(model, state.module_names, layer, modules, stats)
        else:
            for module in modules:
                module.balance = stats
    setattr(model, ADAPTER_ATTRIBUTE, state)
    model.register_forward_pre_hook(_reset_routing_statistics)
    return state


def _attach_shared_router(model: nn.Module, names: list[str], layer: int, modules: list[MoELoRALinear],
                          stats: BalanceStatistics | None) -> None:
    block_name = _block_prefix(next(n for n in names if block_index(n) == layer), layer)
    block = model.get_submodule(block_name)
    hidden_size = model.config.hidden_size if hasattr(model, "config") else modules[0].in_features
    router = SharedRouter(hidden_size, modules[0].num_experts, modules[0].top_k, modules[0].lora_A,
                          modules[0].renormalize)
    router.modules_to_feed, router.balance = modules, stats
    setattr(block, LAYER_ROUTER_ATTRIBUTE, router)

    def route(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        router.route(hidden)

    block.register_forward_pre_hook(route, with_kwargs=True)


def modules_hidden(candidates: dict[str, tuple[int, nn.Module]]) -> int:
    """The residual width of a model without a config: the input width of its first adapted linear."""
    from .layer import base_features

    return base_features(next(iter(candidates.values()))[1])[0]


def adapter_state(model: nn.Module) -> AdapterState:
    """The AdapterState of a model with injected adapters."""
    state = getattr(model, ADAPTER_ATTRIBUTE, None)
    if state is None:
        raise AdapterError("this model has no alphalora adapters; call inject_adapters first")
    return state


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name: experts, routers and any modules_to_save."""
    state = getattr(model, ADAPTER_ATTRIBUTE, None)
    heads = tuple(f"{name}." for name in state.plan.modules_to_save) if state is not None else ()
    return {n: p for n, p in model.named_parameters()
            if "lora_A" in n or "lora_B" in n or "router" in n or n.startswith(heads)}
