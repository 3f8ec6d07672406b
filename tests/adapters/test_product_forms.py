"""Every product form of the fused adapter functions (the base GEMM accumulating into the adapter's update,
split-K over the tokens) computes what the op-by-op autograd chain computes, in values and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from alphalora.adapters import MoELoRALinear, product_forms
from alphalora.adapters.product_forms import SPLIT_MIN_TOKENS, ProductForms, token_reduction
from tests.conftest import requires_cuda

FORMS = [ProductForms(adapter_first, splits) for adapter_first, splits in itertools.product((False, True), (1, 3))]


@pytest.fixture
def use_forms(monkeypatch):
    def use(forms: ProductForms):
        monkeypatch.setattr(product_forms, "forms", forms)
    return use


def _layer(experts: int, dropout: float, bias: bool, hidden: int = 64) -> MoELoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(hidden, hidden - 4, bias=bias).requires_grad_(False)
    layer = MoELoRALinear(base, experts, min(2, experts), 4, lora_alpha=8.0, dropout=dropout).train()
    assert layer.kernel_for("cpu", torch.float32) == "dense"  # (E x r within half the input width)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    return layer


def _run(layer: MoELoRALinear, x: torch.Tensor, op_chain: bool, monkeypatch):
    """The output and the gradients of the adapter's parameters and x; through the op-by-op chain (the layer's
    path where the fused function cannot run) when op_chain."""
    with monkeypatch.context() as patch:
        if op_chain:
            patch.setattr(MoELoRALinear, "_fusable_base_weight", lambda *_: None)
        torch.manual_seed(5)  # the same dropout mask on every path
        out = layer(x)
    params = [layer.lora_A, layer.lora_B, x] + ([layer.router.weight] if layer.router is not None else [])
    return out, torch.autograd.grad(out.square().sum(), params)


@pytest.mark.parametrize("forms", FORMS, ids=lambda f: f"first{int(f.adapter_first)}-splits{f.token_splits}")
@pytest.mark.parametrize("experts", [1, 6])
@pytest.mark.parametrize("dropout,bias", [(0.0, True), (0.3, False)])
def test_each_form_equals_the_op_by_op_chain(forms, experts, dropout, bias, use_forms, monkeypatch):
    layer = _layer(experts, dropout, bias)
    # three whole slices of SPLIT_MIN_TOKENS tokens and a remainder, so that split-K runs with its tail product
    x = torch.randn(3 * SPLIT_MIN_TOKENS + 37, 64, requires_grad=True)
    want_out, want_grads = _run(layer, x, op_chain=True, monkeypatch=monkeypatch)
    use_forms(forms)
    got_out, got_grads = _run(layer, x, op_chain=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("tokens,splits,used", [(SPLIT_MIN_TOKENS * 4, 4, 4), (SPLIT_MIN_TOKENS * 2 + 5, 4, 2),
                                                (SPLIT_MIN_TOKENS - 1, 4, 1)])
def test_token_reduction_splits_only_where_each_slice_is_worth_a_product(tokens, splits, used, use_forms,
                                                                         monkeypatch):
    a, b = torch.randn(tokens, 5, dtype=torch.bfloat16), torch.randn(tokens, 7, dtype=torch.bfloat16)
    use_forms(ProductForms(token_splits=splits))
    calls = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda p, q, **kw: calls.append(p.shape[0]) or original(p, q, **kw))
    got = token_reduction(a, b)
    assert calls[:1] == ([used] if used > 1 else [])
    # split-K sums float32 partials and returns float32; one product stays in the inputs' dtype
    assert got.dtype == (torch.float32 if used > 1 else torch.bfloat16)
    torch.testing.assert_close(got.float(), a.T.double().mm(b.double()).float(), rtol=2e-2, atol=5e-2)


def test_token_reduction_keeps_float64_in_float64(use_forms):
    """Split-K widens half precision to float32 and narrows nothing: float64 sums stay float64."""
    tokens = SPLIT_MIN_TOKENS * 3 + 5
    a, b = torch.randn(tokens, 5, dtype=torch.float64), torch.randn(tokens, 7, dtype=torch.float64)
    use_forms(ProductForms(token_splits=3))
    got = token_reduction(a, b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, a.T @ b, rtol=1e-12, atol=1e-12)


def test_forms_refuse_a_split_count_below_one():
    with pytest.raises(ValueError, match="token_splits must be at least 1"):
        ProductForms(token_splits=0)


@pytest.mark.parametrize("forms", FORMS[1:], ids=lambda f: f"first{int(f.adapter_first)}-splits{f.token_splits}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_each_form_in_each_dtype_equals_the_default_form(device, forms, dtype, use_forms, monkeypatch):
    """In bf16 too (into float32 split-K partials; on the GPU straight from bf16, and through cuBLAS's beta = 1),
    against the default form, which the layer tests hold to the loop and the CPU; the router's logits come from
    the same product in both, so the experts chosen are the same and the difference is the sums' rounding."""
    layer = _layer(6, 0.0, True).to(device, dtype)
    for param in (layer.lora_A, layer.lora_B, layer.router.weight):
        param.data = param.data.float()  # adapter_dtype: float32 adapters over a half-precision base
    x = torch.randn(3 * SPLIT_MIN_TOKENS + 37, 64, device=device, dtype=dtype, requires_grad=True)
    want_out, want_grads = _run(layer, x, op_chain=False, monkeypatch=monkeypatch)
    use_forms(forms)
    got_out, got_grads = _run(layer, x, op_chain=False, monkeypatch=monkeypatch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
