"""The serving engine's expert selection (`alphalora::select_experts`) against a per-token loop
written out independently: each token's own router's logits, the renormalised top-k of their full
softmax, times its adapter's scaling, ids offset to the adapter's place in the expert stack."""

from __future__ import annotations

import pytest
import torch

from alphalora import ops
from alphalora.ops import reference
from tests.conftest import requires_cuda

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
IMPLEMENTATIONS = {"kernel": ops.select_experts, "reference": reference.select_experts}


def _inputs(tokens=41, routers=3, experts=5, dtype=torch.float32, device="cpu", seed=0):
    """logits (T, M * E) as a column slice of a wider GEMM output (strided rows), each token's router,
    its adapter's scaling and its first expert id."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(tokens, routers * experts + 3, generator=g, dtype=torch.float64).to(device, dtype)
    member = torch.randint(0, routers, (tokens,), generator=g).to(device)
    scale = (torch.rand(tokens, generator=g) * 4).to(device)
    base = (member * experts + torch.randint(0, 100, (tokens,), generator=g).to(device)).to(device)
    return wide[:, : routers * experts], member, scale, base


def _oracle(logits, member, scale, base, experts, top_k):
    gates, ids = [], []
    for t in range(logits.shape[0]):
        own = logits[t, member[t] * experts:(member[t] + 1) * experts].double()
        top, chosen = torch.softmax(own, dim=-1).topk(top_k)
        gates.append(top / top.sum() * scale[t].double())
        ids.append(chosen + base[t])
    return torch.stack(gates), torch.stack(ids)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("routers,experts,top_k", [(1, 1, 1), (3, 5, 2), (2, 4, 4), (4, 40, 3)])
def test_select_experts_equals_each_tokens_own_router_top_k(implementation, device, dtype, routers, experts, top_k):
    logits, member, scale, base = _inputs(routers=routers, experts=experts, dtype=dtype, device=device)
    gates, ids = IMPLEMENTATIONS[implementation](logits, member, scale, base, experts, top_k)
    want_gates, want_ids = _oracle(logits.cpu(), member.cpu(), scale.cpu(), base.cpu(), experts, top_k)
    assert gates.dtype == torch.float32 and ids.dtype == torch.long and gates.shape == ids.shape == (41, top_k)
    assert torch.equal(ids.cpu(), want_ids)  # largest first (bf16 ties would be broken by lower expert)
    torch.testing.assert_close(gates.double().cpu(), want_gates, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("device", DEVICES)
def test_select_experts_break_ties_by_lower_expert_and_pass_opcheck(implementation, device):
    logits = torch.tensor([[9.0, 9.0, 1.0, 3.0, 3.0, 0.5], [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]], device=device)
    member, base = torch.tensor([1, 0], device=device), torch.tensor([10, 20], device=device)
    select = IMPLEMENTATIONS[implementation]
    gates, ids = select(logits, member, torch.tensor([2.0, 1.0], device=device), base, 3, 2)
    assert ids.tolist() == [[10, 11], [20, 21]]  # row 0 reads [3, 3, 0.5], row 1 [2, 2, 2]
    torch.testing.assert_close(gates.cpu(), torch.tensor([[1.0, 1.0], [0.5, 0.5]]))
    torch.library.opcheck(torch.ops.alphalora.select_experts.default, (*_inputs(device=device), 5, 2))


def test_select_experts_refuse_bad_input_with_the_fix():
    logits, member, scale, base = _inputs(routers=3, experts=5)
    with pytest.raises(RuntimeError, match="not a multiple of num_experts = 4"):
        ops.select_experts(logits, member, scale, base, 4, 2)
    with pytest.raises(RuntimeError, match="top_k must be in \\[1, 5\\], got 6"):
        ops.select_experts(logits, member, scale, base, 5, 6)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        ops.select_experts(logits, member, scale.double(), base, 5, 2)
    with pytest.raises(RuntimeError, match="member and base must be int64 with one entry per token"):
        ops.select_experts(logits, member[:-1], scale, base, 5, 2)
    outside = member.clone()
    outside[7] = 3
    with pytest.raises(RuntimeError, match="token 7 names router 3, outside the 3 routers"):
        ops.select_experts(logits, outside, scale, base, 5, 2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_select_experts_equal_the_cpu_kernel(dtype):
    """More tokens than one block, 40 experts per router, strided rows."""
    inputs = _inputs(tokens=1000, routers=4, experts=40, dtype=dtype)
    gates, ids = ops.select_experts(*inputs, 40, 3)
    gates_gpu, ids_gpu = ops.select_experts(*(t.cuda() for t in inputs), 40, 3)
    assert torch.equal(ids_gpu.cpu(), ids)
    torch.testing.assert_close(gates_gpu.cpu(), gates, rtol=1e-6, atol=1e-6)
