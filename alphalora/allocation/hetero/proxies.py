"""Zero-cost proxies that score LoRA modules and shortcuts from a few minibatches.

Every proxy scores a candidate from its A and B factors (and, for ``alpha``, its base weight):

- constant: 1 for every candidate (the selection is then a seeded random draw). No passes.
- grad-norm: ||G_A||_F + ||G_B||_F, with G the gradient summed over k minibatches. k forward + k backward.
- snip: sum |A * G_A| + sum |B * G_B| (absolute value after accumulation). k forward + k backward.
- synflow (the HeteroLoRA task-loss form): every weight replaced by its absolute value, an all-ones
  `inputs_embeds` with the first batch's mask and labels, R = the task loss;
  sum |A * dR/dA| + sum |B * dR/dB|, signs restored after. 1 forward + 1 backward.
- fisher (zero-cost-nas's channel form on the rank-r bottleneck z = A x, per minibatch):
  1/2 mean_b sum_c (sum_t z_tc dL_b/dz_tc)^2. k forward + k backward.
- alpha: the power-law alpha (AlphaLoRA's xmin_peak fit) of the candidate's base weight spectrum;
  a shortcut takes its layer's mean. No passes, one eigendecomposition per weight.

k minibatches are the first k of the training data, unshuffled, in evaluation mode (no dropout).
LoRA's B = 0 start makes A's gradient, and so SNIP, SynFlow and Fisher, exactly zero. Where B is
all zero those three score a *probe perturbation*: B is set to ``PROBE_SCALE * N(0, 1)`` (seeded)
for the scoring passes and restored to zero afterwards; the scores are then linear (Fisher:
quadratic) in the probe scale, so the ranking does not depend on it. grad-norm needs no probe
(at B = 0 it is ||G_B||, as in the authors' code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..expert_counts import AllocationError
from ..plan import PROXY_NAMES, parse_shortcut

PROBE_SCALE = 1e-3
PROXY_COST = {
    "constant": "no forward or backward passes",
    "grad-norm": "k forward + k backward passes",
    "snip": "k forward + k backward passes",
    "synflow": "1 forward + 1 backward pass",
    "fisher": "k forward + k backward passes",
    "alpha": "no passes; one eigendecomposition per candidate's base weight",
}
DATA_PROXIES = ("grad-norm", "snip", "synflow", "fisher")


def check_proxy(proxy: str) -> None:
    if proxy not in PROXY_NAMES:
        raise AllocationError(f"unknown proxy {proxy!r}; choose one of {', '.join(PROXY_NAMES)}")


def _grad(param: torch.Tensor) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


@contextlib.contextmanager
def _scoring(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Evaluation mode with every candidate on and clean gradients; everything restored after."""
    was_training, enabled = model.training, {n: m.enabled for n, m in modules.items()}
    model.eval()
    for module in modules.values():
        module.enabled = True
    model.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        for name, module in modules.items():
            module.enabled = enabled[name]
        model.train(was_training)


@contextlib.contextmanager
def _probe(modules: dict[str, nn.Module], seed: int) -> Iterator[None]:
    """B <- PROBE_SCALE * N(0, 1) where B is all zero, for the duration of the scoring."""
    generator = torch.Generator().manual_seed(seed)
    zeroed = [m for m in modules.values() if not m.lora_B.detach().any()]
    with torch.no_grad():
        for module in zeroed:
            noise = torch.randn(module.lora_B.shape, generator=generator, dtype=torch.float32)
            module.lora_B.copy_(noise * PROBE_SCALE)
    try:
        yield
    finally:
        with torch.no_grad():
            for module in zeroed:
                module.lora_B.zero_()


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def _weight_times_grad(module: nn.Module) -> float:
    a, b = module.lora_A.detach(), module.lora_B.detach()
    return float((a * _grad(module.lora_A)).abs().sum() + (b * _grad(module.lora_B)).abs().sum())


def _each(batches: Sequence[dict], progress: bool, what: str):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"{what} proxy", unit="batch")


def _accumulate(model: nn.Module, batches: Sequence[dict], progress: bool, what: str) -> None:
    for batch in _each(batches, progress, what):
        _loss(model, batch).backward()


def grad_norm(model, modules, batches, seed, progress) -> dict[str, float]:
    _accumulate(model, batches, progress, "grad-norm")
    return {n: float(_grad(m.lora_A).norm() + _grad(m.lora_B).norm()) for n, m in modules.items()}


def snip(model, modules, batches, seed, progress) -> dict[str, float]:
    with _probe(modules, seed):
        _accumulate(model, batches, progress, "snip")
        return {n: _weight_times_grad(m) for n, m in modules.items()}


def fisher(model, modules, batches, seed, progress) -> dict[str, float]:
    # sum_t z_tc dL/dz_tc = sum_i A_ci dL/dA_ci, since dL/dA = sum_t (dL/dz_t) x_t^T and z = A x.
    totals = dict.fromkeys(modules, 0.0)
    with _probe(modules, seed):
        for batch in _each(batches, progress, "fisher"):
            _loss(model, batch).backward()
            for name, module in modules.items():
                channel = (module.lora_A.detach() * _grad(module.lora_A)).sum(dim=-1)
                totals[name] += 0.5 * float((channel**2).sum())
            model.zero_grad(set_to_none=True)
    return {name: total / len(batches) for name, total in totals.items()}


def synflow(model, modules, batches, seed, progress) -> dict[str, float]:
    """The HeteroLoRA form: |weights|, an all-ones `inputs_embeds`, the first batch's mask and labels."""
    first = batches[0]
    embed = model.get_input_embeddings()
    with _probe(modules, seed):
        params = [p for p in model.parameters() if p.is_floating_point()]
        with torch.no_grad():
            signs = [torch.sign(p) for p in params]
            for p in params:
                p.abs_()
        try:
            ids = first["input_ids"]
            ones = torch.ones(*ids.shape, embed.embedding_dim, dtype=embed.weight.dtype, device=embed.weight.device)
            inputs = {"inputs_embeds": ones, "attention_mask": first["attention_mask"], "labels": first["labels"]}
            _loss(model, inputs).backward()
            scores = {n: _weight_times_grad(m) for n, m in modules.items()}
        finally:
            with torch.no_grad():
                for p, sign in zip(params, signs, strict=True):
                    p.mul_(sign)
    return scores


def spectral_alpha(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, float]:
    """Each LoRA candidate's base-weight alpha (AlphaLoRA's xmin_peak); shortcuts get their layer's mean."""
    from alphalora.spectral import analyze

    report = analyze(model, progress=False)
    by_name = {m.name.removesuffix(".base"): m.alpha for m in report.matrices if m.alpha is not None}
    by_layer = {layer.layer: layer.alpha for layer in report.layers}
    scores = {}
    for name in modules:
        shortcut = parse_shortcut(name)
        if shortcut is not None:
            scores[name] = by_layer.get(shortcut[0], float("nan"))
        else:
            scores[name] = by_name.get(name, float("nan"))  # no fit (too few eigenvalues): ranked last
    return scores


_DATA_PROXY_FUNCTIONS = {"grad-norm": grad_norm, "snip": snip, "synflow": synflow, "fisher": fisher}


def score_candidates(proxy: str, model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[dict],
                     seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Scores every candidate (LoRA module or shortcut, by plan name) with `proxy`; higher is more useful."""
    check_proxy(proxy)
    if proxy == "constant":
        return dict.fromkeys(modules, 1.0)
    if proxy == "alpha":
        return spectral_alpha(model, modules)
    if not batches:
        raise AllocationError(f"the {proxy} proxy needs at least one minibatch of training data")
    with _scoring(model, modules):
        return _DATA_PROXY_FUNCTIONS[proxy](model, modules, batches, seed, progress)
