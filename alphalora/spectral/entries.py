"""One weight matrix as the model walks yield it (`WeightEntry`), and the error for weights that cannot be read.

Shared by the general walk (`weights`) and the mixture-of-experts reader (`experts`), so neither imports the other
for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .roles import block_index, expert_index, role_of


class WeightSourceError(ValueError):
    """The model cannot be read: a missing path, no weights, an unsupported format or a damaged file."""


@dataclass(frozen=True)
class WeightEntry:
    """One weight matrix: its name, place in the model and a loader for its (out, in) tensor.

    One expert's matrix of a mixture of experts is an entry of its own, named `<experts module>.<expert>.<proj>`
    (see `experts.expert_matrices`), with `expert` its index; `expert` is None for every other matrix."""

    name: str
    layer: int | None
    role: str
    shape: tuple[int, int]  # (out_features, in_features)
    kind: str  # "linear", "conv1d" or "embedding"
    load: Callable[[], torch.Tensor]
    floating: bool = True  # False for integer (quantized) weights, which have no meaningful spectrum
    expert: int | None = None  # the expert's index, for one expert's matrix in a mixture of experts

    @property
    def num_eigenvalues(self) -> int:
        return min(self.shape)


def named_entry(
    name: str, shape: tuple[int, int], kind: str, load: Callable[[], torch.Tensor], floating: bool = True,
    role: str | None = None,
) -> WeightEntry:
    """The entry for matrix `name`, its block, role (unless given) and expert read off the name."""
    return WeightEntry(
        name, block_index(name), role or role_of(name), shape, kind, load, floating, expert_index(name)
    )
