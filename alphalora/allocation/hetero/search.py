"""HeteroLoRA: score every candidate adapter with a zero-cost proxy, keep the best under a budget."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from alphalora._numbers import is_number, is_positive_int, is_positive_number
from alphalora.spectral.roles import block_index

from ..expert_counts import AllocationError
from ..plan import (
    POOLS,
    UNCHANGING_PROXIES,
    Plan,
    Reallocation,
    all_shortcut_names,
    parse_shortcut,
)
from .budget import Candidate, check_budget, check_ranks, parameters_used, select
from .proxies import DATA_PROXIES, PROBE_SCALE, PROXY_COST, check_proxy, check_scores_finite, score_candidates

DEFAULT_PROXY_BATCHES = 32  # the authors' imp_limit_test_batches
DEFAULT_PROXY_BATCH_SIZE = 8
ONE_BATCH_PROXIES = ("synflow",)  # reads only the first minibatch (proxies.synflow)


def candidates_of(model: nn.Module) -> list[Candidate]:
    """The switchable adapters of a model with injected adapters: LoRA modules, then shortcuts."""
    from alphalora.adapters.inject import adapter_state

    state = adapter_state(model)
    found = []
    for name in state.module_names:
        module = model.get_submodule(name)
        found.append(Candidate(name, "lora", block_index(name), module.in_features, module.out_features))
    for name, shortcut in state.shortcuts.items():
        layer, _ = parse_shortcut(name)
        found.append(Candidate(name, "shortcut", layer, shortcut.features, shortcut.features))
    return found


def batches_read(proxy: str, batches: int) -> int:
    """How many of the `batches` proxy minibatches `proxy` reads: none, the first only (synflow), or all."""
    if proxy not in DATA_PROXIES:
        return 0
    return 1 if proxy in ONE_BATCH_PROXIES else batches


def first_minibatches(examples: Sequence[dict], pad_id: int, batches: int, batch_size: int, proxy: str, *,
                      fix: str | None = None) -> list[dict]:
    """The first minibatches of the training data the proxy reads, unshuffled (the authors' choice).
    `fix` says what to do when the data is too short (default: `alphalora allocate`'s options)."""
    from alphalora.training.data import DataError, collate

    count = batches_read(proxy, batches)
    needed = count * batch_size
    if len(examples) < needed:
        raise DataError(f"{_reads(proxy, count, batch_size)} but the data has only {len(examples)}; "
                        f"{fix or _data_fix(proxy)}")
    join = collate(pad_id)
    return [join(list(examples[i * batch_size:(i + 1) * batch_size])) for i in range(count)]


def _reads(proxy: str, count: int, batch_size: int) -> str:
    return (f"the {proxy} proxy reads {count} minibatch{'es' if count != 1 else ''} of {batch_size} "
            f"({count * batch_size} examples)")


def _data_fix(proxy: str) -> str:
    fewer = "" if proxy in ONE_BATCH_PROXIES else "fewer --proxy-batches, "
    return f"pass {fewer}a smaller --proxy-batch-size, or more data"


def reallocate(model: nn.Module, settings: Reallocation, batches: Sequence[dict], ranks: Sequence[int],
               progress: bool = False) -> tuple[dict[str, int], dict[str, float]]:
    """Re-scores all candidates and switches on the chosen ones (the rest keep their weights)."""
    from alphalora.adapters.inject import adapter_state

    state = adapter_state(model)
    modules = state.switchable_modules(model)
    scores = score_candidates(settings.proxy, model, modules, batches, settings.seed, progress)
    check_scores_finite(settings.proxy, scores)  # a run that diverged stops here, not on a tie-break's choice
    chosen = select(candidates_of(model), scores, settings.budget, ranks, pools=settings.pools,
                    shortcut_share=settings.shortcut_share, seed=settings.seed)
    state.set_disabled(model, [name for name in modules if name not in chosen])
    return chosen, scores


def allocate_hetero(
    model_dir: str | Path,
    data: str | Path,
    *,
    proxy: str = "grad-norm",
    budget: int,
    task: str = "causal-lm",
    ranks: Sequence[int] = (8,),
    target_modules: Sequence[str] | None = None,
    shortcuts: bool = False,
    pools: str = "joint",
    shortcut_share: float | None = None,
    dynamic_every: int | None = None,
    proxy_batches: int = DEFAULT_PROXY_BATCHES,
    proxy_batch_size: int = DEFAULT_PROXY_BATCH_SIZE,
    lora_alpha: float = 16.0,
    shortcut_alpha: float = 4.0,
    lora_dropout: float = 0.05,
    max_length: int | None = None,
    truncate: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Plan:
    """HeteroLoRA: which modules (and shortcut connections) get LoRA, at which rank, within `budget` parameters.

    Builds every candidate (the `target_modules` roles in every block, and with `shortcuts` the
    four shortcut connections per block) at the largest candidate rank, scores them with `proxy`
    on the first `proxy_batches` minibatches of `data`, and enables the best under `budget`
    trainable adapter parameters (a task head trained alongside is not counted). One rank:
    on/off as in the paper; several: rank levels from the scores. With `dynamic_every` the plan
    keeps every candidate and training re-scores and re-selects every that many steps. `truncate`
    cuts rows longer than `max_length` instead of refusing them (as in training).
    """
    from transformers import set_seed

    from alphalora.adapters.inject import AdapterError, candidate_modules, inject_adapters, modules_hidden
    from alphalora.adapters.io import base_fingerprint
    from alphalora.training.api import load_model_and_data
    from alphalora.training.data import DataError

    check_proxy(proxy)
    levels = check_ranks([], ranks)
    _check_options(proxy, budget, levels, shortcuts, pools, shortcut_share, dynamic_every, proxy_batches,
                   proxy_batch_size, lora_alpha, shortcut_alpha)
    try:
        _check_data_size(data, proxy, proxy_batches, proxy_batch_size)
        set_seed(seed)  # the task head a classification model gets while loading is part of the scores
        model, tokenizer, train_set, _, _ = load_model_and_data(model_dir, data, task, max_length=max_length,
                                                                truncate=truncate)
        batches = first_minibatches(train_set.examples, tokenizer.pad_token_id, proxy_batches, proxy_batch_size,
                                    proxy)
    except DataError as error:
        raise AllocationError(str(error)) from error
    fingerprint = base_fingerprint(model)  # training warns if it gets another model (its name may differ)
    blocks = candidate_modules(model)
    if not blocks:
        raise AllocationError(f"{model_dir}: no adaptable linear layers inside transformer blocks")
    num_layers = max(layer for layer, _ in blocks.values()) + 1
    roles = list(target_modules) if target_modules else _block_roles(blocks)
    hidden_size = getattr(model.config, "hidden_size", None) or modules_hidden(blocks)
    if shortcuts and levels[-1] > hidden_size:
        raise AllocationError(f"candidate rank {levels[-1]} is larger than a shortcut connection allows ({hidden_size} "
                              f"x {hidden_size}, rank at most {hidden_size}); pass smaller --ranks")
    supernet = Plan(
        method="hetero", base_model=str(model_dir), experts_per_layer=[1] * num_layers,
        top_k_per_layer=[1] * num_layers, target_modules=roles, rank=levels[-1], lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, shortcut_alpha=shortcut_alpha,
        shortcuts=dict.fromkeys(all_shortcut_names(num_layers), levels[-1]) if shortcuts else {},
    )
    set_seed(seed)
    try:
        state = inject_adapters(model, supernet)
    except AdapterError as error:
        raise AllocationError(str(error)) from error
    candidates = candidates_of(model)
    check_ranks(candidates, levels)
    check_budget(candidates, budget, levels)

    start = time.perf_counter()
    scores = score_candidates(proxy, model, state.switchable_modules(model), batches, seed, progress)
    seconds = time.perf_counter() - start
    check_scores_finite(proxy, scores)
    chosen = select(candidates, scores, budget, levels, pools=pools, shortcut_share=shortcut_share, seed=seed)
    source = {
        "budget": budget, "parameters": parameters_used(candidates, chosen), "proxy": proxy,
        "proxy_cost": PROXY_COST[proxy].replace("k ", f"{proxy_batches} "), "proxy_seconds": round(seconds, 3),
        "proxy_batches": batches_read(proxy, proxy_batches), "proxy_batch_size": proxy_batch_size,
        "probe_scale": PROBE_SCALE if proxy in ("snip", "synflow", "fisher") else None,
        "ranks": levels, "pools": pools, "candidates": len(candidates), "scores": scores, "seed": seed,
        "candidate_roles": roles, "base_fingerprint": fingerprint,
    }
    lora_names = [c.name for c in candidates if c.kind == "lora"]
    if dynamic_every is not None:
        settings = Reallocation(every=dynamic_every, proxy=proxy, budget=budget, batches=len(batches),
                                batch_size=proxy_batch_size, pools=pools, shortcut_share=shortcut_share, seed=seed)
        return Plan(**{**_fields(supernet), "target_modules": lora_names, "source": source, "reallocation": settings,
                       "disabled_modules": sorted(c.name for c in candidates if c.name not in chosen)})
    enabled = [name for name in lora_names if name in chosen]
    return Plan(**{**_fields(supernet), "target_modules": enabled, "rank_pattern": {n: chosen[n] for n in enabled},
                   "shortcuts": {n: r for n, r in chosen.items() if n not in lora_names}, "source": source})


def _check_options(proxy, budget, levels, shortcuts, pools, shortcut_share, dynamic_every, proxy_batches,
                   proxy_batch_size, lora_alpha, shortcut_alpha) -> None:
    """Refuses bad or contradictory settings before the model is loaded, naming the option and the fix."""
    if pools not in POOLS:
        raise AllocationError(f"pools must be one of {', '.join(POOLS)}, got {pools!r}")
    if not all(is_positive_int(n) for n in (proxy_batches, proxy_batch_size)):
        raise AllocationError("--proxy-batches and --proxy-batch-size must be at least 1")
    if shortcut_share is not None:
        if pools != "separate" or not shortcuts:
            raise AllocationError("--shortcut-share (shortcut_share) is the shortcuts' budget share with --pools "
                                  "separate and --shortcuts; pass both, or leave --shortcut-share out")
        if not is_number(shortcut_share) or not 0 <= shortcut_share <= 1:
            raise AllocationError(f"--shortcut-share (shortcut_share) must be between 0 and 1, got {shortcut_share!r}")
    if pools == "separate" and not shortcuts:
        raise AllocationError("--pools separate splits the budget between modules and shortcut connections; without "
                              "--shortcuts there is one pool: pass --shortcuts, or leave --pools out")
    if dynamic_every is not None:
        if not is_positive_int(dynamic_every) or len(levels) != 1:
            raise AllocationError("--dynamic-every takes a positive step count and one candidate rank (the paper's "
                                  "on/off re-selection); pass a single --ranks value")
        if proxy in UNCHANGING_PROXIES:
            why = ("its seeded random draw" if proxy == "constant" else "the frozen base weights it scores") + \
                " is the same every round"
            raise AllocationError(f"--dynamic-every with --proxy {proxy} would never change the selection ({why}); "
                                  f"use a proxy that reads data ({', '.join(DATA_PROXIES)}), or leave "
                                  "--dynamic-every out for a static plan")
    if not is_positive_int(budget):
        raise AllocationError(f"the budget is a number of trainable parameters (a positive integer), got {budget!r}")
    for flag, value in (("--lora-alpha (lora_alpha)", lora_alpha), ("--shortcut-alpha (shortcut_alpha)",
                                                                     shortcut_alpha)):
        if not is_positive_number(value):
            raise AllocationError(f"{flag} must be a positive number (scaling = alpha / rank), got {value!r}")


def _check_data_size(data, proxy: str, batches: int, batch_size: int) -> None:
    from alphalora.training.data import DataError, read_rows

    rows, count = len(read_rows(data)), batches_read(proxy, batches)
    if rows < count * batch_size:
        raise DataError(f"{_reads(proxy, count, batch_size)} but {data} has only {rows}; {_data_fix(proxy)}")


def _fields(plan: Plan) -> dict:
    return {name: getattr(plan, name) for name in plan.__dataclass_fields__}


def _block_roles(blocks: dict[str, tuple[int, nn.Module]]) -> list[str]:
    from alphalora.spectral.roles import is_projection, ordered_roles, role_of

    return ordered_roles(role_of(name) for name, (_, module) in blocks.items() if is_projection(module.weight.shape))

