"""A step's routing layouts, built on the host and copied once: every token's gate and virtual expert
as its adapter's scaling and stack offset say, and the one-copy upload they ride on."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from alphalora.serving.engine.adapter_stacks import AdapterStacks
from alphalora.serving.engine.adapters import LoadedAdapter, ModuleAdapter
from alphalora.serving.engine.routing_layout import build_bucket_layout
from alphalora.serving.engine.upload import upload
from tests.conftest import requires_cuda


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_upload_returns_every_array_with_its_dtype_shape_and_values(device):
    rng = np.random.default_rng(0)
    arrays = {"ids": rng.integers(-5, 10**12, size=(3, 7)), "gates": rng.random(5, dtype=np.float32),
              "odd": rng.random(3, dtype=np.float32),  # 12 bytes: the next array starts after padding
              "scales": rng.random((2, 2)), "mask": rng.random(9) > 0.5, "empty": np.zeros((0, 1), np.int64),
              "small": rng.integers(0, 9, size=3).astype(np.int32), "transposed": rng.random((4, 3)).T}
    tensors = upload(arrays, device)
    assert list(tensors) == list(arrays)
    for name, array in arrays.items():
        tensor = tensors[name]
        assert tensor.device.type == device and tensor.shape == array.shape, name
        np.testing.assert_array_equal(tensor.cpu().numpy(), array, err_msg=name)


def _adapter(rng: random.Random, name: str, rank: int, routed_experts: int | None) -> LoadedAdapter:
    experts = routed_experts or 1
    module = ModuleAdapter(A=torch.randn(experts, rank, 16), B=torch.randn(experts, 8, rank),
                           scaling=rng.choice([0.5, 2.0, 16 / 3]), top_k=1 if routed_experts is None else 2,
                           router=None if routed_experts is None else torch.randn(experts, 16))
    return LoadedAdapter(name, Path("."), {"q": module})


def _bucket(seed: int, num_tokens: int, kinds: list[int | None]):
    """Adapters (None: plain LoRA, else a router over that many experts) dealt random rows of the step."""
    rng = random.Random(seed)
    adapters = [_adapter(rng, f"a{i}", 4, kind) for i, kind in enumerate(kinds)]
    owner = [rng.randrange(len(adapters)) for _ in range(num_tokens)]
    bucket = [(a, np.asarray([t for t in range(num_tokens) if owner[t] == i], dtype=np.int64))
              for i, a in enumerate(adapters)]
    return [(a, rows) for a, rows in bucket if rows.size]


def _expected(bucket, stacks: AdapterStacks, experts):
    """Each token's (scaling, first virtual expert, router member or None), read off its own adapter."""
    expected = {}
    for adapter, rows in bucket:
        module = adapter.modules["q"]
        member = None
        if module.router is not None:
            routers = stacks.routers("q", module.num_experts,
                                     [a for a, _ in bucket if a.modules["q"].num_experts == module.num_experts
                                      and a.modules["q"].router is not None])
            member = routers.offsets[adapter.uid] // module.num_experts
        for row in rows.tolist():
            expected[row] = (module.scaling, experts.offsets[adapter.uid], member)
    return expected


@pytest.mark.parametrize("seed,kinds,width", [
    (0, [None, None, None], 1024),  # plain LoRA only, every token: dense-masked gates
    (1, [None, None, None], 16),  # plain LoRA only, too wide for dense: routed in batch order
    (2, [3, 3], 16),  # one router group holding every token: batch order
    (3, [None, 3, 2, 3, None], 16),  # mixed: gathered rows
])
def test_every_token_gets_its_adapters_scaling_offset_and_router(seed, kinds, width):
    num_tokens = 23
    bucket = _bucket(seed, num_tokens, kinds)
    stacks = AdapterStacks()
    experts = stacks.experts("q", 4, [a for a, _ in bucket])
    routers = {}
    for adapter, _ in bucket:
        module = adapter.modules["q"]
        if module.router is not None:
            routers[module.num_experts] = stacks.routers("q", module.num_experts, [
                a for a, _ in bucket if a.modules["q"].router is not None
                and a.modules["q"].num_experts == module.num_experts])
    expected = _expected(bucket, stacks, experts)
    layout = build_bucket_layout("q", bucket, experts, routers, num_tokens, width, "cpu")
    assert layout.only_adapter is None
    seen = {}
    if layout.dense_gates is not None:  # [tokens, stacked experts]: the scaling at the adapter's expert only
        assert layout.rows is None and not layout.groups
        for row in range(num_tokens):
            scaling, offset, _ = expected[row]
            want = torch.zeros(experts.rows)
            want[offset] = scaling
            assert torch.equal(layout.dense_gates[row], want), row
        return
    rows = list(range(num_tokens)) if layout.rows is None else layout.rows.tolist()
    plain = layout.plain_ids.shape[0]
    for position in range(plain):
        seen[rows[position]] = (layout.plain_gates[position, 0].item(), layout.plain_ids[position, 0].item(), None)
    position = plain
    for group in layout.groups:
        group_rows = rows[position:position + group.member.shape[0]] if group.rows is None else group.rows.tolist()
        for i, row in enumerate(group_rows):
            seen[row] = (group.scale[i].item(), group.base[i].item(), group.member[i].item())
        position += len(group_rows)
    assert set(seen) == set(range(num_tokens))
    for row in range(num_tokens):
        scaling, offset, member = expected[row]
        assert seen[row] == (pytest.approx(scaling), offset, member), row
    assert (layout.rows is None) == (len({kind for kind in kinds}) == 1)


def test_one_plain_adapter_holding_every_token_needs_no_copy():
    bucket = _bucket(4, 9, [None])
    stacks = AdapterStacks()
    experts = stacks.experts("q", 4, [a for a, _ in bucket])
    layout = build_bucket_layout("q", bucket, experts, {}, 9, 16, "cpu")
    adapter = bucket[0][0]
    assert layout.only_adapter == (experts.offsets[adapter.uid], adapter.modules["q"].scaling)
    assert layout.rows is None and layout.plain_ids is None and not layout.groups
