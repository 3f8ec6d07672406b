"""Dynamic HeteroLoRA: a Trainer callback that re-scores every candidate and re-selects every K steps."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from alphalora.adapters.inject import adapter_state
from alphalora.allocation.hetero import reallocate
from alphalora.allocation.plan import Reallocation


class ReallocationCallback(TrainerCallback):
    """Before the optimizer steps 0, K, 2K, ... : score all candidates (switched-off ones included)
    on the proxy minibatches, switch on the best under the budget, switch off the rest (they keep
    their weights and get no gradient until chosen again).

    Scoring runs in evaluation mode and draws from its own seeded generators, so a resumed run
    makes the same choices as an uninterrupted one. Under data parallel every process scores and
    then takes process 0's selection, so that no near-tie broken differently on one process (GPU
    reductions are not bit-reproducible) trains different modules there. `history` records each
    round and its cost.
    """

    def __init__(self, model, settings: Reallocation, batches: Sequence[dict], rank: int):
        self.model, self.settings, self.batches, self.rank = model, settings, batches, rank
        self.history: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.settings.every:
            return control
        start = time.perf_counter()
        chosen, _ = reallocate(self.model, self.settings, self.batches, [self.rank])
        chosen = selection_of_process_0(self.model, chosen)
        self.history.append({"step": state.global_step, "seconds": round(time.perf_counter() - start, 4),
                             "enabled": sorted(chosen)})
        return control

    @property
    def seconds(self) -> float:
        return sum(entry["seconds"] for entry in self.history)


def selection_of_process_0(model: nn.Module, chosen: dict[str, int]) -> dict[str, int]:
    """Process 0's selection, switched on in `model` where this process chose otherwise (a no-op outside
    data parallel). Every process must call it, as every process scores."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return chosen
    shared = [chosen]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] != chosen:
        state = adapter_state(model)
        state.set_disabled(model, [name for name in state.switchable_modules(model) if name not in shared[0]])
    return shared[0]
