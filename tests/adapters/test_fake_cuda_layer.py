"""Training's GPU path without a GPU: MoE-LoRA layers and an adapted model on `cuda:0` over a bfloat16 base,
with float32 adapter weights (`adapter_dtype`).

Fake tensors (`tests.fake_cuda`) carry devices and dtypes but no values: these tests check that every
activation, gradient and routing statistic stays on the GPU in the dtype it should have, and that no value is
read back to the host (each read would stall the host until the GPU caught up); the CPU tests and the GPU tests
check the numbers. Torch's autograd engine asks the (absent) GPU for its current stream
when it runs a backward over CUDA tensors, so a backward cannot run here: the fused layers' hand-written
backward functions are called directly instead.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alphalora.adapters import MoELoRALinear, adapter_parameters, inject_adapters
from alphalora.allocation import Plan
from alphalora.allocation.plan import RouterSettings
from tests.fake_cuda import CUDA, assert_on_device, fake_cuda
from tests.tiny_models import build

HALF = torch.bfloat16


def _layer(experts: int, top_k: int, kernel: str, dropout: float, rank: int = 4) -> MoELoRALinear:
    """A layer over a frozen bfloat16 base on the fake GPU (call inside `fake_cuda`)."""
    base = nn.Linear(24, 20, device=CUDA, dtype=HALF).requires_grad_(False)
    return MoELoRALinear(base, experts, top_k, rank, lora_alpha=8.0, dropout=dropout, kernel=kernel).train()


class _Context:
    """What an autograd function's forward and backward read of their context, outside the autograd engine."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@pytest.mark.parametrize("experts,top_k", [(1, 1), (4, 2)])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_layers_forward_runs_on_the_gpu_over_a_bfloat16_base(kernel, experts, top_k, dropout, monkeypatch):
    with fake_cuda(monkeypatch) as audit:
        layer = _layer(experts, top_k, kernel, dropout)
        x = torch.randn(3, 5, 24, device=CUDA, dtype=HALF, requires_grad=True)
        out = layer(x)
        trained = [layer.lora_A, layer.lora_B] + ([layer.router.weight] if layer.router is not None else [])
    assert out.shape == (3, 5, 20)
    assert_on_device(out, dtype=HALF)
    assert_on_device(trained, dtype=torch.float32)  # float32 adapters over a half-precision base
    assert audit.cpu_compute == []
    assert audit.host_reads == []  # nothing waits for the GPU: the host queues a whole step's work


@pytest.mark.parametrize("dropped", [False, True], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("grad_logits", [False, True], ids=["task loss", "with aux loss"])
def test_the_fused_dense_functions_backward_stays_on_the_gpu(dropped, grad_logits, monkeypatch):
    from alphalora.adapters.fused import _DenseMoELoRA, _LoRA

    with fake_cuda(monkeypatch) as audit:
        x = torch.randn(6, 24, device=CUDA, dtype=HALF)
        x_dropped = torch.randn_like(x) if dropped else None
        weight, bias = torch.randn(20, 24, device=CUDA, dtype=HALF), torch.randn(20, device=CUDA, dtype=HALF)
        router = torch.randn(4, 24, device=CUDA)
        lora_A, lora_B = torch.randn(4, 3, 24, device=CUDA), torch.randn(4, 20, 3, device=CUDA)
        moe = _Context((True, dropped, False, False, True, True, True, False, False))
        out, logits, ids = _DenseMoELoRA.forward(moe, x, x_dropped, weight, bias, router, lora_A, lora_B, 2.0, 2)
        moe_grads = _DenseMoELoRA.backward(moe, torch.randn_like(out), torch.randn_like(logits) if grad_logits
                                           else None, None)
        plain = _Context((True, dropped, False, False, True, True, False))
        lora_out = _LoRA.forward(plain, x, x_dropped, weight, bias, lora_A[:1], lora_B[:1], 2.0)
        lora_grads = _LoRA.backward(plain, torch.randn_like(lora_out))
    assert_on_device([out, lora_out], dtype=HALF)
    assert_on_device(logits)
    assert_on_device(ids, dtype=torch.long)
    # (the autograd engine casts each gradient to its input's dtype: float32 adapters get bfloat16 ones cast)
    assert_on_device([g for g in moe_grads + lora_grads if g is not None], dtype=HALF)
    assert [g is not None for g in moe_grads] == [True, dropped, False, False, True, True, True, False, False]
    assert audit.cpu_compute == []
    assert audit.host_reads == []  # nothing waits for the GPU: the host queues a whole step's work


def test_gates_from_a_shared_router_stay_on_the_gpu(monkeypatch):
    with fake_cuda(monkeypatch) as audit:
        layer = _layer(4, 2, "dense", 0.0)
        x = torch.randn(6, 24, device=CUDA, dtype=HALF)
        layer.shared_gates = torch.softmax(x.float() @ torch.randn(24, 4, device=CUDA), dim=-1)
        out = layer(x)
    assert_on_device(out, dtype=HALF)
    assert audit.cpu_compute == []
    assert audit.host_reads == []  # nothing waits for the GPU: the host queues a whole step's work


@pytest.mark.parametrize("router", [RouterSettings(aux_loss_coef=0.01),
                                    RouterSettings(type="shared", aux_loss_coef=0.01)], ids=["own", "shared"])
def test_an_adapted_models_training_forward_runs_on_the_gpu_with_its_load_balancing_loss(router, monkeypatch):
    """An injected tiny Llama in bfloat16 (as `alphalora train --bf16` loads it): the task loss and the routers'
    auxiliary loss on the GPU, the adapters' weights in float32 there."""
    model = build("llama", seed=0)
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[3, 2], top_k_per_layer=[2, 1],
                target_modules=["q", "v", "down"], rank=4, lora_alpha=8.0, lora_dropout=0.1, router=router)
    with fake_cuda(monkeypatch) as audit:
        model = model.to(CUDA, HALF)
        state = inject_adapters(model, plan)
        model.train()
        ids = torch.randint(0, 128, (2, 7), device=CUDA)
        loss = model(input_ids=ids, labels=ids).loss
        aux = state.aux_loss()
        trained = adapter_parameters(model)
    assert_on_device([loss, aux], dtype=torch.float32)
    assert trained
    assert_on_device(list(trained.values()), dtype=torch.float32)
    assert audit.cpu_compute == []
    assert audit.host_reads == []  # nothing waits for the GPU: the host queues a whole step's work


@pytest.mark.parametrize("dtype,path", [(HALF, "dense"), (torch.float32, "grouped")])
def test_auto_takes_the_dense_path_in_half_precision_on_a_gpu(dtype, path, monkeypatch):
    """E*r = 32 for 24 inputs: past in/2 (grouped, as on the CPU and in float32), within 2 x in (dense where the
    tensor cores run the dense products)."""
    import alphalora.adapters.layer as layer_module

    taken = []
    dense = layer_module.dense_moe_lora
    monkeypatch.setattr(layer_module, "dense_moe_lora", lambda *args: taken.append("dense") or dense(*args))
    grouped = MoELoRALinear._grouped_delta
    monkeypatch.setattr(MoELoRALinear, "_grouped_delta", lambda self, x: taken.append("grouped") or grouped(self, x))
    with fake_cuda(monkeypatch):
        base = nn.Linear(24, 20, device=CUDA, dtype=dtype).requires_grad_(False)
        layer = MoELoRALinear(base, 8, 2, 4, lora_alpha=8.0)
        layer(torch.randn(3, 24, device=CUDA, dtype=dtype))
    assert taken == [path]
