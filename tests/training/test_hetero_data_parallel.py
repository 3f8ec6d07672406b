"""Dynamic HeteroLoRA under data parallel: a re-selection round must not upset DDP's search for the weights a
step leaves without gradient (find_unused_parameters), or the first step after it fails on every process."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from alphalora.adapters.inject import inject_adapters
from alphalora.allocation import Plan
from alphalora.allocation.hetero import reallocate, score_candidates, search
from alphalora.allocation.plan import Reallocation, all_shortcut_names
from alphalora.training.reallocation import ReallocationCallback
from tests.tiny_models import build

PROXIES = ["grad-norm", "snip", "synflow", "fisher"]


def _batches(count=2):
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 120, (2, 8), generator=generator) for _ in range(count)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def _supernet():
    model = build("llama", initializer_range=0.2)
    plan = Plan(method="hetero", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, lora_dropout=0.0,
                shortcuts=dict.fromkeys(all_shortcut_names(2), 4))
    state = inject_adapters(model, plan)
    torch.manual_seed(3)
    with torch.no_grad():  # trained factors: every proxy scores something non-zero
        for module in state.switchable_modules(model).values():
            module.lora_B.normal_(0, 0.1)
    return model.train(), state


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one process: DDP's reducer runs as under torchrun, without spawning anything."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_reselection_round_leaves_the_next_data_parallel_step_working(proxy, one_process_group):
    model, state = _supernet()
    wrapped = DistributedDataParallel(model, find_unused_parameters=True)  # as `alphalora train` asks for it
    settings = Reallocation(every=2, proxy=proxy, budget=400, batches=2, batch_size=2)
    chosen, _ = reallocate(model, settings, _batches(), [4])
    off = [name for name in state.switchable_modules(model) if name not in chosen]
    assert off  # some candidates are switched off: this step leaves their weights without gradient
    wrapped(**_batches(1)[0]).loss.backward()  # used to fail: "gradient which is undefined, but still allreduced"
    modules = state.switchable_modules(model)
    assert all(modules[name].lora_A.grad is None for name in off)
    assert all(modules[name].lora_B.grad is not None for name in chosen)


@pytest.mark.parametrize("proxy", PROXIES)
def test_scoring_leaves_every_gradient_field_untouched(proxy):
    """The proxies read their gradients without writing .grad: a gradient already there (an accumulation in
    progress, a task head's) is neither cleared nor added to, and none appears where there was none."""
    model, state = _supernet()
    model(**_batches(1)[0]).loss.backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert before
    score_candidates(proxy, model, state.switchable_modules(model), _batches())
    after = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def _round_on_a_process_that_ranks_by_name(rank: int, store: str, out: str) -> None:
    """One re-selection round on process `rank` of 2, whose proxy ranks the candidates by name: ascending
    on process 0, descending on process 1 (a near-tie broken differently, made large)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        def by_name(proxy, model, modules, *args, **kwargs):
            names = sorted(modules, reverse=rank == 1)
            return {name: float(len(names) - i) for i, name in enumerate(names)}

        search.score_candidates = by_name
        model, state = _supernet()
        settings = Reallocation(every=2, proxy="grad-norm", budget=400, batches=2, batch_size=2)
        callback = ReallocationCallback(model, settings, _batches(), 4)
        callback.on_step_begin(None, SimpleNamespace(global_step=0), None)
        enabled = sorted(name for name, module in state.switchable_modules(model).items() if module.enabled)
        with open(f"{out}.{rank}", "w") as file:
            json.dump({"enabled": enabled, "recorded": callback.history[0]["enabled"],
                       "disabled": state.plan.disabled_modules}, file)
    finally:
        dist.destroy_process_group()


def test_data_parallel_processes_train_the_selection_of_process_0(tmp_path):
    out = str(tmp_path / "round")
    mp.spawn(_round_on_a_process_that_ranks_by_name, args=(str(tmp_path / "store"), out), nprocs=2)
    first, second = (json.loads(open(f"{out}.{rank}").read()) for rank in (0, 1))
    # The oracle: what process 0's ranking selects on one process.
    model, state = _supernet()
    names = sorted(state.switchable_modules(model))
    alone = search.select(search.candidates_of(model), {n: float(len(names) - i) for i, n in enumerate(names)},
                          400, [4], pools="joint", shortcut_share=None, seed=0)
    assert sorted(alone) != sorted(names)  # the budget leaves some out, so the two rankings disagree
    for result in (first, second):
        assert result["enabled"] == result["recorded"] == sorted(alone)
        assert result["disabled"] == sorted(set(names) - set(alone))
