"""Adapters' weights stacked per module, each adapter at a fixed row offset (vLLM's slot idea).

A step's tokens address an expert as (its adapter's offset + expert), so a batch using any subset
of the stacked adapters reads the same tensors and nothing is copied per step. A stack is rebuilt
only when an adapter it lacks first appears; it then drops the adapters the registry has evicted
since (members are held weakly), so it never holds more than the resident adapters plus the ones
evicted after its last rebuild. Each member's own tensors become views of the stack, so the
weights are held once, as in vLLM's preallocated LoRA slots.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import torch

from .adapters import LoadedAdapter


@dataclass
class AdapterStack:
    """Several adapters' tensors for one module, concatenated along the first dimension."""

    tensors: tuple[torch.Tensor, ...]
    offsets: dict[int, int]  # adapter uid -> its first row
    members: list[weakref.ReferenceType[LoadedAdapter]]
    generation: int  # unique per build: tells a rebuilt stack from the one it replaced

    def has_all(self, adapters: list[LoadedAdapter]) -> bool:
        return all(adapter.uid in self.offsets for adapter in adapters)

    @property
    def rows(self) -> int:
        return self.tensors[0].shape[0]

    @functools.cached_property
    def up_dense(self) -> torch.Tensor:
        """An expert stack's B [experts, out, rank] as one matrix [out, experts * rank] (columns by
        expert, then rank), for the dense-masked product over every expert at once: a copy, made on
        first use and kept with the stack (so a dense-masked module holds its B twice)."""
        up = self.tensors[1]
        return up.permute(1, 0, 2).reshape(up.shape[1], -1)

    def copy_nbytes(self) -> int:
        """Bytes of the copies kept with the stack: `up_dense`, once made."""
        copy = self.__dict__.get("up_dense")
        return 0 if copy is None else copy.numel() * copy.element_size()


class AdapterStacks:
    """The stacks of every adapted module, built on first use."""

    def __init__(self):
        self._stacks: dict[tuple, AdapterStack] = {}
        self._generations = itertools.count()

    def experts(self, name: str, rank: int, adapters: list[LoadedAdapter]) -> AdapterStack:
        """(A [experts, rank, in], B [experts, out, rank]) of module `name` over adapters of this rank."""
        return self._stack(("experts", name, rank), name, adapters, ("A", "B"))

    def routers(self, name: str, num_experts: int, adapters: list[LoadedAdapter]) -> AdapterStack:
        """(router [adapters * num_experts, in],) of module `name` over routed adapters of this expert count."""
        return self._stack(("routers", name, num_experts), name, adapters, ("router",))

    def nbytes(self) -> int:
        """The stacked adapter weights (each once) and the copies kept with the stacks."""
        weights = sum(t.numel() * t.element_size() for stack in self._stacks.values() for t in stack.tensors)
        return weights + self.copy_nbytes()

    def copy_nbytes(self) -> int:
        """What the stacks keep besides the adapters' own weights: dense-masked modules' `up_dense`."""
        return sum(stack.copy_nbytes() for stack in self._stacks.values())

    def _stack(self, key: tuple, name: str, adapters: list[LoadedAdapter], fields: tuple[str, ...]) -> AdapterStack:
        stack = self._stacks.get(key)
        if stack is not None and stack.has_all(adapters):
            return stack
        members = [] if stack is None else [a for a in (ref() for ref in stack.members) if a is not None]
        known = {a.uid for a in members}
        for adapter in adapters:
            if adapter.uid not in known:
                members.append(adapter)
                known.add(adapter.uid)
        modules = [adapter.modules[name] for adapter in members]
        offsets, spans, row = {}, [], 0
        for adapter, module in zip(members, modules, strict=True):
            offsets[adapter.uid] = row
            spans.append((row, row + getattr(module, fields[0]).shape[0]))
            row = spans[-1][1]
        tensors = tuple(torch.cat([getattr(module, field) for module in modules]) for field in fields)
        for module, (start, end) in zip(modules, spans, strict=True):
            for field, stacked in zip(fields, tensors, strict=True):
                setattr(module, field, stacked[start:end])  # the previous stack is freed with its last view
        stack = AdapterStack(tensors, offsets, [weakref.ref(a) for a in members], next(self._generations))
        self._stacks[key] = stack
        return stack
