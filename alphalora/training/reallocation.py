"""Dynamic HeteroLoRA: a Trainer callback that re-scores every candidate and re-selects every K steps."""

from __future__ import annotations

import time
from collections.abc import Sequence

from transformers import TrainerCallback

from alphalora.allocation.hetero import reallocate
from alphalora.allocation.plan import Reallocation


class ReallocationCallback(TrainerCallback):
    """Before the optimizer steps 0, K, 2K, ... : score all candidates (switched-off ones included)
    on the proxy minibatches, switch on the best under the budget, switch off the rest (they keep
    their weights and get no gradient until chosen again).

    Scoring runs in evaluation mode and draws from its own seeded generators, so a resumed run
    makes the same choices as an uninterrupted one. `history` records each round and its cost.
    """

    def __init__(self, model, settings: Reallocation, batches: Sequence[dict], rank: int):
        self.model, self.settings, self.batches, self.rank = model, settings, batches, rank
        self.history: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.settings.every:
            return control
        start = time.perf_counter()
        chosen, _ = reallocate(self.model, self.settings, self.batches, [self.rank])
        self.history.append({"step": state.global_step, "seconds": round(time.perf_counter() - start, 4),
                             "enabled": sorted(chosen)})
        return control

    @property
    def seconds(self) -> float:
        return sum(entry["seconds"] for entry in self.history)
