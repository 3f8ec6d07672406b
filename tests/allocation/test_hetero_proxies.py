"""Zero-cost proxies against an independent computation on a PEFT LoRA twin of the same model."""

from __future__ import annotations

import pytest
import torch

from alphalora.adapters.inject import inject_adapters
from alphalora.allocation import Plan
from alphalora.allocation.expert_counts import AllocationError
from alphalora.allocation.hetero import proxies, score_candidates
from tests.tiny_models import build

peft = pytest.importorskip("peft")
TARGETS = {"q": "q_proj", "v": "v_proj", "down": "down_proj"}


def _batches(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, 120, (2, 8), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _ours(trained_b: bool):
    model = build("llama", initializer_range=0.2)
    plan = Plan(method="hetero", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=list(TARGETS), rank=4, lora_alpha=8.0, lora_dropout=0.0)
    state = inject_adapters(model, plan)
    if trained_b:
        torch.manual_seed(7)
        with torch.no_grad():
            for name in state.module_names:
                model.get_submodule(name).lora_B.normal_(0, 0.2)
    return model, state.switchable_modules(model)


def _peft_twin(ours_modules):
    """PEFT LoRA on the same base with the same A and B (scale 8/4 = 2 in both)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS.values()), lora_dropout=0.0)
    twin = peft.get_peft_model(build("llama", initializer_range=0.2), config)
    layers = {}
    with torch.no_grad():
        for name, module in ours_modules.items():
            peft_module = twin.base_model.model.get_submodule(name)
            peft_module.lora_A["default"].weight.copy_(module.lora_A[0])
            peft_module.lora_B["default"].weight.copy_(module.lora_B[0])
            layers[name] = peft_module
    return twin.eval(), layers


def _peft_grads(twin, layers, batches):
    for batch in batches:
        twin(**batch).loss.backward()
    return {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in layers.items()}


def test_grad_norm_equals_the_norms_of_the_accumulated_peft_gradients():
    model, modules = _ours(trained_b=False)
    twin, layers = _peft_twin(modules)
    batches = _batches()
    scores = score_candidates("grad-norm", model, modules, batches)
    for name, (a, b) in _peft_grads(twin, layers, batches).items():
        expected = float(a.grad.norm() + b.grad.norm())
        assert scores[name] == pytest.approx(expected, rel=1e-5)
        assert a.grad.abs().max() == 0  # B = 0: A gets no gradient, the score is ||G_B|| (as the authors')
    assert all(m.lora_A.grad is None for m in modules.values())  # gradients cleared after scoring


def test_snip_on_trained_factors_equals_weight_times_accumulated_gradient():
    model, modules = _ours(trained_b=True)
    twin, layers = _peft_twin(modules)
    batches = _batches()
    scores = score_candidates("snip", model, modules, batches)
    for name, (a, b) in _peft_grads(twin, layers, batches).items():
        expected = float((a.detach() * a.grad).abs().sum() + (b.detach() * b.grad).abs().sum())
        assert scores[name] == pytest.approx(expected, rel=1e-5)


def _peft_bottlenecks(twin, layers, batch):
    """Runs one minibatch through the PEFT twin: {name: (z, dL/dz)}, z = lora_A(x) as [batch, tokens, r]."""
    bottlenecks = {}

    def keep(name):
        def hook(_module, _inputs, output):
            output.retain_grad()
            bottlenecks[name] = output
        return hook

    handles = [m.lora_A["default"].register_forward_hook(keep(n)) for n, m in layers.items()]
    twin(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    twin.zero_grad()
    return {name: (z.detach(), z.grad) for name, z in bottlenecks.items()}


def test_fisher_is_the_per_example_channel_form_on_the_bottleneck_activation():
    # Reference (zero-cost-nas): per channel c, 1/2 mean_n (sum over example n's tokens of z * dL/dz)^2.
    model, modules = _ours(trained_b=True)
    twin, layers = _peft_twin(modules)
    batches = _batches()
    scores = score_candidates("fisher", model, modules, batches)
    expected, examples = dict.fromkeys(layers, 0.0), 0
    for batch in batches:
        real = batch["attention_mask"].unsqueeze(-1)  # padding does not count
        for name, (z, grad) in _peft_bottlenecks(twin, layers, batch).items():
            per_example = (z * grad * real).sum(dim=1)  # [examples, r]: summed over tokens only
            expected[name] += 0.5 * float((per_example**2).sum())
        examples += batch["input_ids"].shape[0]
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value / examples, rel=1e-4)


def test_fisher_with_one_example_per_minibatch_is_the_parameter_gradient_form_for_modules_and_shortcuts():
    # With one example in a minibatch, sum_t z_tc dL/dz_tc = sum_i A_ci dL/dA_ci: an oracle from A's gradient
    # alone, without hooks. Covers LoRA modules and every shortcut kind.
    from alphalora.allocation.plan import all_shortcut_names

    model = build("llama", initializer_range=0.2)
    plan = Plan(method="hetero", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v"], rank=4, lora_alpha=8.0, lora_dropout=0.0, shortcut_alpha=4.0,
                shortcuts=dict.fromkeys(all_shortcut_names(2), 4))
    modules = inject_adapters(model, plan).switchable_modules(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for module in modules.values():
            module.lora_B.normal_(0, 0.2)
    singles = [{k: v[n:n + 1] for k, v in batch.items()} for batch in _batches() for n in range(2)]
    scores = score_candidates("fisher", model, modules, singles)
    expected = dict.fromkeys(modules, 0.0)
    for batch in singles:
        model(**batch).loss.backward()
        for name, module in modules.items():
            channels = (module.lora_A.detach() * module.lora_A.grad).sum(dim=-1)
            expected[name] += 0.5 * float((channels**2).sum()) / len(singles)
        model.zero_grad(set_to_none=True)
    assert sum(name.startswith("layer") for name in modules) == 7
    for name, value in expected.items():
        assert value > 0 and scores[name] == pytest.approx(value, rel=1e-4)


def test_fisher_ignores_padding_columns():
    model, modules = _ours(trained_b=True)
    batches = _batches()
    pads = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3, dtype=torch.long),
            "labels": torch.full((2, 3), -100)}
    padded = [{k: torch.cat([v, pads[k]], dim=1) for k, v in batch.items()} for batch in batches]
    plain = score_candidates("fisher", model, modules, batches)
    wider = score_candidates("fisher", model, modules, padded)
    for name in modules:
        assert wider[name] == pytest.approx(plain[name], rel=1e-5)


def test_synflow_is_the_task_loss_gradient_through_absolute_weights_and_restores_the_model():
    model, modules = _ours(trained_b=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    twin, layers = _peft_twin(modules)
    batches = _batches()
    scores = score_candidates("synflow", model, modules, batches)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # signs restored
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.abs_()
    first = batches[0]
    ones = torch.ones(2, 8, 32)
    twin(inputs_embeds=ones, attention_mask=first["attention_mask"], labels=first["labels"]).loss.backward()
    for name, module in layers.items():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        expected = float((a.detach() * a.grad).abs().sum() + (b.detach() * b.grad).abs().sum())
        assert scores[name] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("proxy", ["snip", "synflow", "fisher"])
def test_weight_gradient_proxies_rank_modules_at_the_zero_b_start_and_leave_b_zero(proxy, monkeypatch):
    model, modules = _ours(trained_b=False)
    batches = _batches()
    scores = score_candidates(proxy, model, modules, batches)
    assert all(v > 0 for v in scores.values())  # without the probe every score would be exactly 0
    assert all(not m.lora_B.any() for m in modules.values())
    monkeypatch.setattr(proxies, "PROBE_SCALE", proxies.PROBE_SCALE / 10)
    smaller = score_candidates(proxy, model, modules, batches)
    assert sorted(scores, key=scores.get) == sorted(smaller, key=smaller.get)  # the ranking is scale-free


@pytest.mark.parametrize("proxy", ["snip", "synflow", "fisher"])
def test_a_mixed_state_ranks_the_same_whatever_the_probe_constant(proxy, monkeypatch):
    # Dynamic re-scoring: layer 0 has trained B, layer 1 still B = 0. The zero-B modules are probed at the
    # trained B's entry RMS, so the constant PROBE_SCALE (which used to decide which group wins) plays no part.
    model, modules = _ours(trained_b=False)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, module in modules.items():
            if ".layers.0." in name:
                module.lora_B.normal_(0, 0.02)
    trained = {n: m.lora_B.detach().clone() for n, m in modules.items() if m.lora_B.any()}
    assert 0 < len(trained) < len(modules)
    rms = torch.stack([b.square().mean() for b in trained.values()]).mean().sqrt()
    assert proxies.probe_scale(modules) == pytest.approx(float(rms))
    batches = _batches()
    rankings = []
    for constant in (1e-3, 1e-1, 10.0):
        monkeypatch.setattr(proxies, "PROBE_SCALE", constant)
        scores = score_candidates(proxy, model, modules, batches)
        rankings.append(sorted(scores, key=lambda n: -scores[n]))
        for name, module in modules.items():  # trained B untouched, probed B back to zero
            assert torch.equal(module.lora_B.detach(), trained[name]) if name in trained else not module.lora_B.any()
    assert rankings[0] == rankings[1] == rankings[2]


def test_alpha_scores_each_module_with_its_base_weight_alpha():
    from alphalora import analyze

    model, modules = _ours(trained_b=False)
    scores = score_candidates("alpha", model, modules, [])
    report = analyze(build("llama", initializer_range=0.2), progress=False)
    for matrix in report.matrices:
        if matrix.name in scores and matrix.alpha is not None:
            assert scores[matrix.name] == pytest.approx(matrix.alpha, rel=1e-6)


def test_constant_scores_are_equal_and_unknown_proxies_are_refused():
    model, modules = _ours(trained_b=False)
    assert set(score_candidates("constant", model, modules, []).values()) == {1.0}
    with pytest.raises(AllocationError, match="unknown proxy 'nope'"):
        score_candidates("nope", model, modules, [])


def test_alpha_ranks_a_flat_base_weight_last_instead_of_by_its_noise_alpha():
    model, modules = _ours(trained_b=False)
    flat = "model.layers.0.self_attn.q_proj"
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    with torch.no_grad():
        modules[flat].base.weight.copy_(3 * q)  # an orthogonal matrix x 3: every eigenvalue 9, alpha ~1e6 of noise
    scores = score_candidates("alpha", model, modules, [])
    assert scores[flat] == proxies.NO_FIT_SCORE == 0.0
    assert all(1.0 < score < 100.0 for name, score in scores.items() if name != flat)


def test_alpha_refuses_nan_base_weights():
    model, modules = _ours(trained_b=False)
    with torch.no_grad():
        modules["model.layers.1.mlp.down_proj"].base.weight[0, 0] = float("nan")
    with pytest.raises(AllocationError, match=r"alpha proxy cannot score 1 candidate\(s\) whose base weights hold NaN "
                                              r"or Inf values \(model.layers.1.mlp.down_proj\)"):
        score_candidates("alpha", model, modules, [])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_scores_finite_names_the_proxy_and_the_candidates(bad):
    proxies.check_scores_finite("fisher", {"a": 1.0, "b": 2.0})
    with pytest.raises(AllocationError, match=r"the fisher proxy scored 1 of 2 candidates NaN or Inf \(b\)"):
        proxies.check_scores_finite("fisher", {"a": 1.0, "b": bad})
