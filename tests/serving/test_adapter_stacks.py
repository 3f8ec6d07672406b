"""The engine's per-module adapter stacks: fixed offsets, no copy per step, evicted adapters dropped."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import torch

from alphalora.serving.engine import Engine, EngineConfig, SamplingParams
from alphalora.serving.engine.adapter_stacks import AdapterStacks
from alphalora.serving.engine.adapters import LoadedAdapter, ModuleAdapter
from tests.serving.test_engine import _adapter, _base, _hf_greedy


def _loaded(seed: int, experts: int = 2, rank: int = 4) -> LoadedAdapter:
    g = torch.Generator().manual_seed(seed)
    module = ModuleAdapter(A=torch.randn(experts, rank, 8, generator=g), B=torch.randn(experts, 6, rank, generator=g),
                           scaling=2.0, top_k=1, router=torch.randn(experts, 8, generator=g))
    return LoadedAdapter(f"adapter{seed}", Path("."), {"q": module})


def _weights(*adapters: LoadedAdapter) -> dict[int, tuple[torch.Tensor, ...]]:
    """Copies of each adapter's (A, B, router) as loaded, before any stack."""
    return {a.uid: tuple(getattr(a.modules["q"], f).clone() for f in ("A", "B", "router")) for a in adapters}


def _assert_rows_are_each_adapters_own(stack, adapters, loaded):
    A, B = stack.tensors
    for adapter in adapters:
        start, module = stack.offsets[adapter.uid], adapter.modules["q"]
        assert torch.equal(A[start:start + module.num_experts], loaded[adapter.uid][0])
        assert torch.equal(B[start:start + module.num_experts], loaded[adapter.uid][1])
        # The adapter's own tensors are views of the stack: its weights are held once.
        assert module.A.untyped_storage().data_ptr() == A.untyped_storage().data_ptr()
        assert torch.equal(module.A, loaded[adapter.uid][0])


def test_a_step_using_a_subset_of_the_stacked_adapters_reuses_the_stack():
    stacks = AdapterStacks()
    a, b, c = _loaded(1), _loaded(2, experts=3), _loaded(3)
    loaded = _weights(a, b, c)
    first = stacks.experts("q", 4, [a, b, c])
    _assert_rows_are_each_adapters_own(first, [a, b, c], loaded)
    again = stacks.experts("q", 4, [c, a])  # another step, other adapters, another order
    assert again is first and again.tensors[0] is first.tensors[0]
    routers = stacks.routers("q", 2, [a, c])
    assert torch.equal(routers.tensors[0][routers.offsets[c.uid]:routers.offsets[c.uid] + 2], loaded[c.uid][2])


def test_a_new_adapter_rebuilds_the_stack_without_the_evicted_ones():
    stacks = AdapterStacks()
    a, b, c, d = _loaded(1), _loaded(2, experts=3), _loaded(3), _loaded(4, experts=1)
    loaded = _weights(a, b, c, d)
    before = stacks.experts("q", 4, [a, b, c])
    generation, old_stack, evicted = before.generation, weakref.ref(before.tensors[0]), b.uid
    del b, before
    gc.collect()  # the registry dropped it: nothing else holds it
    after = stacks.experts("q", 4, [d, a])
    assert after.generation != generation
    assert set(after.offsets) == {a.uid, c.uid, d.uid} and evicted not in after.offsets
    _assert_rows_are_each_adapters_own(after, [a, c, d], loaded)
    assert old_stack() is None  # no member still views the stack it replaced
    assert after.rows == 2 + 2 + 1
    assert stacks.nbytes() == sum(t.numel() * t.element_size() for m in (a, c, d) for t in (m.modules["q"].A,
                                                                                              m.modules["q"].B))


def test_adapters_evicted_between_batches_leave_the_stacks_and_outputs_stay_generates(tmp_path):
    folders = {name: _adapter(tmp_path / name, "llama", experts, seed=seed)
               for name, experts, seed in (("moe_a", (3, 2), 1), ("lora", (1, 1), 3), ("moe_c", (3, 2), 9))}
    engine = Engine(_base("llama"), tokenizer=None, config=EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=32, block_size=4, max_loras=2,
        adapters={k: str(v) for k, v in folders.items()}))
    torch.manual_seed(3)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    waves = [["moe_a", "lora", "moe_a"], ["moe_c", "moe_a", "moe_c"]]
    lora_uid = None
    for names in waves:
        prompts = [torch.randint(1, 128, (n,)).tolist() for n in (6, 11, 4)]
        seqs = engine.generate(prompts, params, names)
        for prompt, name, seq in zip(prompts, names, seqs, strict=True):
            assert seq.output_ids == _hf_greedy("llama", prompt, 4, adapter=folders[name]), name
        if lora_uid is None:
            lora_uid = engine.adapters.get("lora").uid
    assert set(engine.adapters.resident) == {"moe_a", "moe_c"}  # the plain LoRA adapter was evicted...
    gc.collect()
    stacked = {uid for stack in engine.runner.stacks._stacks.values() for uid in stack.offsets}
    assert lora_uid not in stacked  # ...and no stack still holds its weights
    assert {engine.adapters.get(name).uid for name in ("moe_a", "moe_c")} <= stacked


def test_the_dense_copy_of_a_stack_is_counted_in_its_memory():
    """A dense-masked module keeps its experts' B once more as one matrix [out, experts * rank]: the
    stacks' memory (and the serving benchmark's adapter memory) count it once it exists."""
    a, b = _loaded(1, experts=1), _loaded(2, experts=3)
    stacks = AdapterStacks()
    stack = stacks.experts("q", 4, [a, b])
    weights = sum(t.numel() * t.element_size() for m in (a, b) for t in (m.modules["q"].A, m.modules["q"].B))
    assert stacks.copy_nbytes() == 0 and stacks.nbytes() == weights
    up = stack.up_dense
    B = stack.tensors[1]
    for e in range(stack.rows):  # columns by expert, then rank
        assert torch.equal(up[:, e * 4:(e + 1) * 4], B[e])
    assert stacks.copy_nbytes() == up.numel() * up.element_size() == 6 * 4 * 4 * 4
    assert stacks.nbytes() == weights + stacks.copy_nbytes()
