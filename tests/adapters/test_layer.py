"""The MoE-LoRA layer against the MoLA-style per-expert loop, in values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from alphalora.adapters import MoELoRALinear, moe_lora_loop_reference
from alphalora.adapters.layer import _compute_dtype
from alphalora.adapters.routing import BalanceStatistics, stable_top_k
from tests.conftest import requires_cuda


def _layer(experts: int, top_k: int, rank: int = 4, dtype=torch.float32, seed: int = 0,
           kernel: str = "dense") -> MoELoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 20, dtype=dtype)
    layer = MoELoRALinear(base, experts, top_k, rank, lora_alpha=8.0, dropout=0.0, kernel=kernel)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # B starts at 0: give the experts something to say
    for p in base.parameters():
        p.requires_grad_(False)
    return layer


def _grads(layer, out, x):
    params = [p for p in (layer.lora_A, layer.lora_B, layer.router.weight if layer.router else None, x)
              if p is not None]
    return torch.autograd.grad(out.float().square().sum(), params)


@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (3, 1), (3, 2), (8, 2), (6, 6)])
def test_matches_the_per_expert_loop_in_values_and_gradients(experts, top_k, kernel):
    layer = _layer(experts, top_k, kernel=kernel)
    x = torch.randn(2, 17, 24, requires_grad=True)
    ours, loop = layer(x), moe_lora_loop_reference(layer, x)
    torch.testing.assert_close(ours, loop, rtol=1e-5, atol=1e-5)
    for g_ours, g_loop in zip(_grads(layer, ours, x), _grads(layer, loop, x), strict=True):
        # float32 sums over every pair of an expert, in the kernel's order or the GEMM's: 1e-5 of the largest
        # entry (the GPU kernels sum each expert's pairs one after another, as their emulation does in CI)
        scale = g_loop.abs().max().clamp(min=1.0).item()
        torch.testing.assert_close(g_ours, g_loop, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("experts,aux_loss", [(1, False), (6, False), (6, True)])
@pytest.mark.parametrize("base", ["linear", "conv1d"])
def test_the_fused_dense_function_equals_the_op_by_op_autograd_chain(dropout, experts, aux_loss, base, monkeypatch):
    """The one-function paths (plain LoRA, MoE-LoRA; base GEMM included, hand-written routing
    backward) against the same math as the base module plus a chain of tensor ops differentiated by
    autograd: dropout on the experts' input only, the load-balancing loss reading the router logits,
    GPT-2's Conv1D."""
    layer = _layer(experts, min(2, experts)).train()
    if base == "conv1d":
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(20, 24)
        with torch.no_grad():
            conv.weight.copy_(layer.base.weight.T)
            conv.bias.copy_(layer.base.bias)
        layer.base = conv.requires_grad_(False)
    layer.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    x = torch.randn(3, 11, 24, requires_grad=True)

    def run(fused: bool):
        if not fused:
            monkeypatch.setattr(MoELoRALinear, "_fusable_base_weight", lambda *_: None)
        layer.balance = BalanceStatistics(experts) if aux_loss else None
        torch.manual_seed(5)  # the same dropout mask on both paths
        out = layer(x)
        loss = out.square().sum() + (3.0 * layer.balance.loss() if aux_loss else 0.0)
        params = [layer.lora_A, layer.lora_B, x] + ([layer.router.weight] if layer.router is not None else [])
        return out, torch.autograd.grad(loss, params)

    (fused_out, fused_grads), (chain_out, chain_grads) = run(True), run(False)
    torch.testing.assert_close(fused_out, chain_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, chain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "grouped"])
def test_bf16_matches_the_loop_at_bf16_tolerance(kernel):
    layer = _layer(8, 2, dtype=torch.bfloat16, kernel=kernel)
    x = torch.randn(64, 24, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), moe_lora_loop_reference(layer, x), rtol=2e-2, atol=2e-2)


def test_zero_initialised_b_leaves_the_base_output_unchanged():
    torch.manual_seed(1)
    base = nn.Linear(16, 12)
    layer = MoELoRALinear(base, 4, 2, 8, lora_alpha=16.0, dropout=0.1)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.scaling == 2.0


def test_gates_are_top_k_renormalised_softmax():
    layer = _layer(5, 2)
    x = torch.randn(30, 24)
    gates = layer.gates(x)
    assert torch.all((gates > 0).sum(1) == 2)
    torch.testing.assert_close(gates.sum(1), torch.ones(30))
    probs = torch.softmax(layer.router(x), -1)
    top, chosen = probs.topk(2, -1)
    assert torch.equal(gates.topk(2, -1).indices.sort(-1).values, chosen.sort(-1).values)
    torch.testing.assert_close(gates.gather(1, chosen), top / top.sum(1, keepdim=True))


def _hand_written_moe(layer: MoELoRALinear, x: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """MoLA's layer token by token in float64: softmax over every expert's router logit, the top-k
    probabilities (divided by their sum only when renormalising), each chosen expert's scaled LoRA."""
    x2 = x.reshape(-1, layer.in_features).double()
    probs = torch.softmax(x2 @ layer.router.weight.double().T, dim=-1)
    top, ids = probs.topk(layer.top_k, dim=-1)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    rows = []
    for t in range(x2.shape[0]):
        row = layer.base.weight.double() @ x2[t] + layer.base.bias.double()
        for j in range(layer.top_k):
            e = int(ids[t, j])
            row = row + top[t, j] * layer.scaling * (layer.lora_B[e].double() @ (layer.lora_A[e].double() @ x2[t]))
        rows.append(row)
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("experts,top_k", [(5, 2), (4, 3)])
def test_renormalize_false_keeps_the_softmax_probabilities_of_the_chosen_experts(renormalize, kernel, experts, top_k):
    """RouterSettings.renormalize reaches the layer: False gates each chosen expert by its softmax probability
    over all experts as it is (gates summing to less than 1), in values and in the router's gradient."""
    layer = _layer(experts, top_k, kernel=kernel)
    layer.renormalize = renormalize
    x = torch.randn(2, 9, 24, requires_grad=True)
    ours, want = layer(x), _hand_written_moe(layer, x, renormalize)
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(_grads(layer, ours, x), _grads(layer, want, x), strict=True):
        torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-5)
    sums = layer.gates(x.reshape(-1, 24)).sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) == renormalize
    torch.testing.assert_close(moe_lora_loop_reference(layer, x).double(), want, rtol=1e-5, atol=1e-5)


def test_stable_top_k_takes_the_largest_first_and_equal_values_by_lower_index():
    values = torch.randint(0, 3, (500, 7)).float()  # many ties
    top, ids = stable_top_k(values, 3)
    for row, chosen in zip(values.tolist(), ids.tolist(), strict=True):
        assert chosen == sorted(range(7), key=lambda e: (-row[e], e))[:3]
    assert torch.equal(top, values.gather(1, ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["dense", "grouped"])
def test_tied_router_logits_pick_the_lower_experts_on_every_path(kernel, dtype):
    """Experts 1, 2 and 3 have the same router row, so every token's logits for them tie: each path
    (the fused dense function and its router_gates kernel, the grouped kernels, the loop) must take
    the same experts, the lower ones, or their outputs part (the serving engine's kernel follows the
    same rule). Router weights and inputs are small integers, so the tied logits are equal to the bit
    however a GEMM orders its sums (with real-valued ones, columns of one GEMM can differ in the
    last bit, and the choice between near-equal experts is rounding's, on any path)."""
    layer = _layer(5, 2, dtype=dtype, kernel=kernel)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        row = torch.randint(-1, 2, (24,), generator=g).to(dtype)
        layer.router.weight.copy_(torch.stack([-2 * row, row, row, row, -row]))  # 0 and 4: the tied ones' negatives
    x = torch.randint(-1, 2, (60, 24), generator=g).to(dtype)
    x = x[(x @ layer.router.weight.T.to(dtype))[:, 1] > 0]  # tokens where the tied experts lead
    _, ids = layer.routing(x)
    assert x.shape[0] > 5 and ids.tolist() == [[1, 2]] * x.shape[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x).float(), moe_lora_loop_reference(layer, x).float(), rtol=tol, atol=tol)
    pinned = copy.deepcopy(layer)
    with torch.no_grad():
        pinned.router.weight[3] *= 0.5  # expert 3 now below 1 and 2 on these tokens: no choice left to ties
    torch.testing.assert_close(layer(x).float(), pinned(x).float(), rtol=tol, atol=tol)


def test_balance_statistics_equal_the_switch_formula_on_concatenated_logits():
    torch.manual_seed(3)
    logits = [torch.randn(40, 6), torch.randn(25, 6)]
    stats = BalanceStatistics(6)
    for lg in logits:
        stats.add(lg, lg.topk(2, -1).indices)
    allcat = torch.cat(logits)
    probs = torch.softmax(allcat, -1).mean(0)
    picks = torch.bincount(allcat.topk(2, -1).indices.reshape(-1), minlength=6).float() / (65 * 2)
    torch.testing.assert_close(stats.loss(), 6 * (picks * probs).sum())
    # Perfectly balanced routing gives exactly 1.
    uniform = BalanceStatistics(4)
    uniform.add(torch.zeros(8, 4), torch.arange(8).remainder(4)[:, None])
    torch.testing.assert_close(uniform.loss(), torch.tensor(1.0))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="top_k"):
        MoELoRALinear(nn.Linear(4, 4), 2, 3, 2, 4.0)
    with pytest.raises(ValueError, match="rank"):
        MoELoRALinear(nn.Linear(4, 4), 2, 1, 0, 4.0)
    with pytest.raises(TypeError, match="only nn.Linear"):
        MoELoRALinear(nn.Conv2d(3, 3, 3), 2, 1, 2, 4.0)


def test_auto_kernel_choice():
    """Grouped past E*r = in/2 on the CPU and in float32 on a GPU; in half precision on a GPU past 2 x in (the H100's
    tensor cores run the dense products, not the grouped kernels: 16x faster there at E*r = in/4)."""
    def chosen(width, experts, rank, device="cpu", dtype=torch.float32):
        return MoELoRALinear(nn.Linear(width, width), experts, 2 if experts > 1 else 1, rank, 16.0).kernel_for(
            device, dtype)

    assert chosen(1024, 8, 8) == "dense"
    assert chosen(256, 16, 8) == "dense" and chosen(256, 17, 8) == "grouped"  # E*r = 128 = in/2, then past it
    assert chosen(256, 64, 8, "cuda", torch.float32) == "grouped"
    assert chosen(256, 64, 8, "cuda", torch.bfloat16) == "dense"  # E*r = 512 = 2 x in
    assert chosen(256, 65, 8, "cuda", torch.float16) == "grouped"
    assert chosen(256, 64, 8, "cpu", torch.bfloat16) == "grouped"
    assert chosen(16, 1, 64) == "dense"
    layer = MoELoRALinear(nn.Linear(256, 256), 64, 2, 8, 16.0)
    x = torch.randn(3, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the choice reads the dtype the products run in
        assert _compute_dtype(x) == torch.bfloat16
    assert _compute_dtype(x) == torch.float32
    grouped = MoELoRALinear(nn.Linear(256, 256), 64, 2, 8, 16.0, kernel="grouped")
    grouped.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), grouped(x))  # auto took the grouped path on the CPU: the same function
    assert MoELoRALinear(nn.Linear(256, 256), 64, 2, 8, 16.0, kernel="dense").kernel_for("cpu", torch.float32) == \
        "dense"
    with pytest.raises(ValueError, match="kernel"):
        MoELoRALinear(nn.Linear(16, 16), 2, 1, 4, 16.0, kernel="fast")


def _clearly_routed_tokens(layer: MoELoRALinear, tokens: torch.Tensor, min_gap: float = 0.05) -> torch.Tensor:
    """The tokens whose top-k experts are not a near tie: in half precision the router's logits move by
    ~1e-2, so a token whose k-th and (k+1)-th logits are closer than that may pick another expert (a
    different but equally right answer, which no tolerance on the output covers)."""
    if layer.router is None or layer.top_k == layer.num_experts:
        return tokens[None]
    logits = layer.router(tokens).detach().sort(dim=-1, descending=True).values
    clear = tokens[logits[:, layer.top_k - 1] - logits[:, layer.top_k] > min_gap]
    assert len(clear) > len(tokens) // 2
    return clear[None]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (8, 2)])
def test_cuda_layer_equals_the_cpu_layer_in_values_and_gradients(experts, top_k, kernel, dtype):
    cpu = _layer(experts, top_k, kernel=kernel)
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    x = _clearly_routed_tokens(cpu, torch.randn(3 * 41, 24)).requires_grad_()
    x_gpu = x.detach().to("cuda", dtype).requires_grad_()
    out_cpu, out_gpu = cpu(x), gpu(x_gpu)
    assert out_gpu.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out_gpu.float().cpu(), out_cpu, rtol=tol, atol=tol)
    for got, want in zip(_grads(gpu, out_gpu, x_gpu), _grads(cpu, out_cpu, x), strict=True):
        torch.testing.assert_close(got.float().cpu(), want, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("experts", [1, 6])
def test_the_layer_compiles_in_one_graph_with_the_same_values_and_gradients(experts):
    layer = _layer(experts, min(2, experts))
    x = torch.randn(2, 7, 24, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(_grads(layer, compiled, x), _grads(layer, eager, x), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("experts", [1, 6])
def test_under_autocast_the_layer_follows_the_fp32_loop_at_bf16_tolerance(experts, kernel):
    layer = _layer(experts, min(2, experts), kernel=kernel)
    x = torch.randn(2, 7, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), moe_lora_loop_reference(layer, x).detach(), rtol=3e-2, atol=3e-2)
    assert layer.lora_A.grad is not None and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("experts", [1, 6])
def test_autocast_to_the_layers_own_dtype_keeps_the_fused_function(weights, experts, monkeypatch):
    """`alphalora train --bf16` loads the model in bf16 and Trainer runs it under bf16 autocast, which
    then casts nothing: the one-function path must still run (it used to fall back to the op chain on
    any autocast), give what it gives without autocast, and follow the fp32 layer. fp32 weights under
    bf16 autocast keep the op chain, whose ops autocast casts one by one."""
    import alphalora.adapters.layer as layer_module

    fused_calls = []
    for name in ("dense_moe_lora", "lora_linear"):
        original = getattr(layer_module, name)
        monkeypatch.setattr(layer_module, name, lambda *a, _f=original: fused_calls.append(1) or _f(*a))
    layer = _layer(experts, min(2, experts), dtype=weights)
    x = torch.randn(2, 9, 24, dtype=weights, requires_grad=True)

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        return out, _grads(layer, out, x)

    out, grads = run(autocast=True)
    assert len(fused_calls) == (1 if weights == torch.bfloat16 else 0)
    assert out.dtype == torch.bfloat16
    if weights == torch.bfloat16:
        plain_out, plain_grads = run(autocast=False)
        torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
        for got, want in zip(grads, plain_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    exact = copy.deepcopy(layer).float()
    x32 = x.detach().float().requires_grad_()
    exact_out = exact(x32)
    torch.testing.assert_close(out.float(), exact_out, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, _grads(exact, exact_out, x32), strict=True):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
