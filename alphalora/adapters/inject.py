"""Building a plan into a transformers model: MoE-LoRA layers on the targeted linears."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from alphalora.allocation.plan import Plan
from alphalora.spectral.roles import block_index, role_of
from alphalora.spectral.weights import unwrap_compiled

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
    """One router per block (the shared-router option): gates from the block's input tokens.

    A pre-hook on the block computes them (`route`) and hands them to the block's adapted modules. Gradient
    checkpointing re-runs the block's forward in backward without its hooks, so the gates are also kept by the
    block input they came from, and a pre-hook on each of the block's children hands them back (`restore`) when
    a recomputation passes that input on: the gates of each forward, however many forwards precede a backward.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, like: torch.Tensor, renormalize: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.top_k = top_k
        self.num_experts = num_experts
        self.renormalize = renormalize
        self.modules_to_feed: list[MoELoRALinear] = []
        self.balance: BalanceStatistics | None = None
        self._gates_by_input: dict[int, tuple[weakref.ref, torch.Tensor]] = {}

    def route(self, hidden: torch.Tensor) -> None:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        logits = tokens @ self.weight.T.to(tokens.dtype)  # (float32 over a half-precision model: adapter_dtype)
        gates, ids = top_k_gates(logits, self.top_k, self.renormalize)
        if self.balance is not None and self.training:
            self.balance.add(logits, ids)
        dense = dense_gates(gates, ids, self.num_experts)
        self._gates_by_input = {key: entry for key, entry in self._gates_by_input.items() if entry[0]() is not None}
        if dense.requires_grad:  # a backward may recompute the block: keep the gates with the input they are of
            self._gates_by_input[id(hidden)] = (weakref.ref(hidden), dense)
        self._feed(dense)

    def restore(self, hidden: torch.Tensor) -> None:
        """Hands the block's modules the gates `route` computed from `hidden`, if it did (a recomputed forward)."""
        entry = self._gates_by_input.get(id(hidden))
        if entry is not None and entry[0]() is hidden:
            self._feed(entry[1])

    def _feed(self, dense: torch.Tensor) -> None:
        for module in self.modules_to_feed:
            module.shared_gates = dense

    def __getstate__(self):
        # (copy.deepcopy, pickling: the gates of past forwards belong to their graphs, not to a copy)
        return {**super().__getstate__(), "_gates_by_input": {}}


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
        None when nothing was routed, or when the plan's aux_loss_coef is 0 (no statistics are kept).

        Read with autograd on (to train on it) after a training-mode forward that ran without autograd, it raises
        AdapterError rather than return a loss that trains nothing: reentrant gradient checkpointing runs the
        blocks that way (use_reentrant=False keeps the routers' graph, as `alphalora train` does)."""
        losses = [stats.loss() for stats in self.balance.values()]
        without_grad = any(stats.without_grad for stats in self.balance.values())
        self.reset_statistics()
        if without_grad and torch.is_grad_enabled():
            raise AdapterError("the routers' load-balancing loss has no gradient: the training-mode forward ran its "
                               "blocks without autograd (reentrant gradient checkpointing, or torch.no_grad()); enable "
                               "checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False} (as "
                               "`alphalora train` does), or read the aux loss under torch.no_grad() to log it")
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def reset_statistics(self) -> None:
        for stats in self.balance.values():
            stats.reset()


def _reset_routing_statistics(model: nn.Module, _args) -> None:
    """Each forward of the model starts the routing statistics afresh. Activation checkpointing
    re-runs the blocks' forwards during backward, after the aux loss was read: without this, those
    re-runs would leak into the next step's aux loss (and its freed graph). Shortcut connections under
    checkpointing are refused here, before the forward, rather than fail inside the backward."""
    state = adapter_state(model)
    if state.shortcuts and model.training and torch.is_grad_enabled() and _checkpointing(model):
        raise AdapterError("LoRA shortcut connections read activations across blocks, which gradient checkpointing "
                           "recomputes block by block (without them); turn it off to train this adapter "
                           "(model.activation_checkpointing_disable(); gradient_checkpointing_disable() on older "
                           "transformers)")
    state.reset_statistics()


def _checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model has gradient checkpointing on (`is_activation_checkpointing`, or
    `is_gradient_checkpointing` on older transformers, without the newer one's deprecation warning)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            return bool(getattr(model, name))
    return False


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


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs")


@contextmanager
def unchanged_on_error(model: nn.Module):
    """Puts the model back as it was (its modules, their hooks, which parameters train, its adapter state) when the
    block raises: a refused plan or adapter folder leaves the base model the caller passed in, not a half-built
    adapter (which a second, corrected call would then adapt again, or refuse)."""
    modules = list(model.modules())
    children = [(module, dict(module._modules)) for module in modules]
    hooks = [(module, name, set(getattr(module, name, {}))) for module in modules for name in _HOOK_DICTS]
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    had_state, state = hasattr(model, ADAPTER_ATTRIBUTE), getattr(model, ADAPTER_ATTRIBUTE, None)
    try:
        yield
    except BaseException:
        for module, kept in children:
            module._modules.clear()
            module._modules.update(kept)
        for module, name, kept_ids in hooks:
            registered = getattr(module, name, {})
            for hook_id in [i for i in registered if i not in kept_ids]:
                del registered[hook_id]
        for parameter, requires_grad in trainable:
            parameter.requires_grad_(requires_grad)
        if had_state:
            setattr(model, ADAPTER_ATTRIBUTE, state)
        elif hasattr(model, ADAPTER_ATTRIBUTE):
            delattr(model, ADAPTER_ATTRIBUTE)
        raise


def _modules_to_save(model: nn.Module, plan: Plan) -> list[nn.Module]:
    """The plan's modules_to_save, each checked: a module of this model that shares no weight with the rest."""
    heads = []
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
        heads.append(head)
    return heads


def inject_adapters(model: nn.Module, plan: Plan) -> AdapterState:
    """Replaces the plan's target linears with MoE-LoRA layers and freezes everything else.

    Targets are roles (q, k, v, o, gate, up, down, ...), module names or suffixes, or glob
    patterns over full names. Layer l gets plan.experts_per_layer[l] experts, top-k
    plan.top_k_per_layer[l]. Raises AdapterError if the plan does not fit the model, leaving
    the model as it was. A torch.compile'd model gets the adapter in the model it wraps.
    """
    model = unwrap_compiled(model)
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
    heads = _modules_to_save(model, plan)
    with unchanged_on_error(model):
        return _build(model, plan, candidates, chosen, heads)


def _build(model: nn.Module, plan: Plan, candidates: dict[str, tuple[int, nn.Module]],
           chosen: dict[str, tuple[int, nn.Module]], heads: list[nn.Module]) -> AdapterState:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    existing = set(model.modules())  # (the modules themselves: their ids could be reused by new ones)
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
    for head in heads:
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
    # New modules start in training mode (nn.Module's default): each takes the mode of the model it joins, so an
    # adapter built or loaded into a model in eval mode runs without dropout (as PEFT's from_pretrained does).
    for module in model.modules():
        if module not in existing:
            module.training = model.training
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
    # Module-level hooks (the copy of a deep-copied model calls them with its own block and children), not closures
    block.register_forward_pre_hook(_route_block, with_kwargs=True)
    for child in block.children():
        if child is not router:
            child.register_forward_pre_hook(functools.partial(_restore_block_gates, block), with_kwargs=True)


def _hidden_states(args, kwargs) -> torch.Tensor | None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


def _route_block(block: nn.Module, args, kwargs) -> None:
    getattr(block, LAYER_ROUTER_ATTRIBUTE).route(_hidden_states(args, kwargs))


def _restore_block_gates(block: nn.Module, _child: nn.Module, args, kwargs) -> None:
    hidden = _hidden_states(args, kwargs)
    if hidden is not None:
        getattr(block, LAYER_ROUTER_ATTRIBUTE).restore(hidden)


def modules_hidden(candidates: dict[str, tuple[int, nn.Module]]) -> int:
    """The residual width of a model without a config: the input width of its first adapted linear."""
    from .layer import base_features

    return base_features(next(iter(candidates.values()))[1])[0]


def adapter_state(model: nn.Module) -> AdapterState:
    """The AdapterState of a model with injected adapters."""
    state = getattr(unwrap_compiled(model), ADAPTER_ATTRIBUTE, None)
    if state is None:
        raise AdapterError("this model has no alphalora adapters; call inject_adapters first")
    return state


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name: experts, routers and any modules_to_save (not the base model's own
    parameters, whatever their names: GPT-OSS's or Llama 4's expert routers are `mlp.router`, `feed_forward.router`)."""
    model = unwrap_compiled(model)
    state = getattr(model, ADAPTER_ATTRIBUTE, None)
    heads = tuple(f"{name}." for name in state.plan.modules_to_save) if state is not None else ()
    own: set[int] = set()
    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            own.update(id(p) for name, p in module.named_parameters() if not name.startswith("base."))
        elif isinstance(module, (SharedRouter, ShortcutLoRA)):
            own.update(id(p) for p in module.parameters())
    return {n: p for n, p in model.named_parameters() if id(p) in own or n.startswith(heads)}
