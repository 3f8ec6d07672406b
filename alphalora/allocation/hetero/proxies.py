"""Zero-cost proxies that score LoRA modules and shortcuts from a few minibatches.

Every proxy scores a candidate from its A and B factors (and, for ``alpha``, its base weight):

- constant: 1 for every candidate (the selection is then a seeded random draw). No passes.
- grad-norm: ||G_A||_F + ||G_B||_F, with G the gradient summed over k minibatches. k forward + k backward.
- snip: sum |A * G_A| + sum |B * G_B| (absolute value after accumulation). k forward + k backward.
- synflow (the HeteroLoRA task-loss form): every weight replaced by its absolute value, an all-ones
  `inputs_embeds` with the first batch's mask and labels, R = the task loss;
  sum |A * dR/dA| + sum |B * dR/dB|, signs restored after. 1 forward + 1 backward.
- fisher (zero-cost-nas's channel form on the rank-r bottleneck z = A x, per example n): the
  activation z and its gradient dL/dz (L the minibatch's loss) are read with hooks during the
  usual passes; per channel c, s_nc = sum over example n's real tokens (attention mask 1, never
  padding) of z_tc dL/dz_tc; score = 1/2 sum_c mean_n s_nc^2, the mean over every example of the
  k minibatches. k forward + k backward.
- alpha: the power-law alpha (AlphaLoRA's xmin_peak fit) of the candidate's base weight spectrum;
  a shortcut takes its layer's mean; 0 (ranked last) where there is no usable fit. No passes, one
  eigendecomposition per weight.

k minibatches are the first k of the training data, unshuffled, in evaluation mode (no dropout).
LoRA's B = 0 start makes A's gradient, and so SNIP, SynFlow and Fisher, exactly zero. Where B is
all zero those three score a *probe perturbation*: B is set to ``scale * N(0, 1)`` (seeded) for
the scoring passes and restored to zero afterwards (see `probe_scale` for the scale). When every
B is zero (a static allocation) the scale is ``PROBE_SCALE`` and every score is (to first order)
linear (Fisher: quadratic) in it, so the ranking does not depend on it. When some B are trained
(dynamic re-scoring) the zero-B candidates are probed at the RMS of the trained B entries, which
no constant of ours sets. grad-norm needs no probe (at B = 0 it is ||G_B||, as in the authors' code).
"""

from __future__ import annotations

import contextlib
import math
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


@contextlib.contextmanager
def _scoring(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Evaluation mode with every candidate on; everything restored after (the proxies write no .grad)."""
    was_training, enabled = model.training, {n: m.enabled for n, m in modules.items()}
    model.eval()
    for module in modules.values():
        module.enabled = True
    try:
        yield
    finally:
        for name, module in modules.items():
            module.enabled = enabled[name]
        model.train(was_training)


def _is_zero(module: nn.Module) -> bool:
    return not module.lora_B.detach().any()


def probe_scale(modules: dict[str, nn.Module]) -> float:
    """The standard deviation of the probe B given to the candidates whose B is all zero.

    - Every B zero (a static allocation, or the first round of a dynamic one): ``PROBE_SCALE``.
      All candidates are probed alike and every score is (to first order) proportional to the scale (SNIP,
      SynFlow) or to its square (Fisher), so the ranking does not depend on this constant.
    - Some B non-zero (dynamic re-scoring after training steps): the root mean square of the
      trained candidates' B entries, sqrt(mean over trained candidates m of mean(B_m^2)).
      Scores are (close to) linear, for Fisher quadratic, in the size of B, so a probe of an
      arbitrary size decides by itself whether the trained or the untrained group wins. The fair
      comparison asks how much the loss would react to an untrained candidate *if it had been
      trained as much as the others*, and the best estimate of such a B's size without training
      is the size the trained ones reached. Entry RMS, not the Frobenius norm, is the
      shape-appropriate measure: B is [out, r] with fan-in r, the same for every candidate at a
      rank, so its entry size sets the size of each output coordinate of s B A x whatever `out`
      is, and Adam-style updates move every entry by about the same step whatever the module's
      width (a Frobenius match would give wide modules smaller entries). Each trained candidate
      counts once, whatever its width. The result depends only on the model's weights.
    """
    trained = [m.lora_B.detach().float() for m in modules.values() if not _is_zero(m)]
    if not trained:
        return PROBE_SCALE
    return float(torch.stack([b.square().mean() for b in trained]).mean().sqrt())


@contextlib.contextmanager
def _probe(modules: dict[str, nn.Module], seed: int) -> Iterator[None]:
    """B <- probe_scale(modules) * N(0, 1) where B is all zero, for the duration of the scoring."""
    generator = torch.Generator().manual_seed(seed)
    scale = probe_scale(modules)
    zeroed = [m for m in modules.values() if _is_zero(m)]
    with torch.no_grad():
        for module in zeroed:
            noise = torch.randn(module.lora_B.shape, generator=generator, dtype=torch.float32)
            module.lora_B.copy_(noise * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for module in zeroed:
                module.lora_B.zero_()


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss


def _weight_times_grad(module: nn.Module, grads: tuple[torch.Tensor, torch.Tensor]) -> float:
    a, b = module.lora_A.detach(), module.lora_B.detach()
    return float((a * grads[0]).abs().sum() + (b * grads[1]).abs().sum())


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # candidate name -> (dL/dA, dL/dB)


def _factor_grads(loss: torch.Tensor, modules: dict[str, nn.Module], into: Factors | None = None) -> Factors:
    """dL/dA and dL/dB of every candidate, added to `into` (accumulation over minibatches).

    torch.autograd.grad, never backward(): no .grad is written, and no gradient is accumulated into a
    weight. Under data parallel (DDP with find_unused_parameters, as `alphalora train` runs dynamic
    HeteroLoRA) an accumulation marks the weight as used for the next synchronised step, and that step
    then fails on every candidate the round switched off ("gradient which is undefined, but still
    allreduced"). Tensor hooks on the way (the fisher proxy's) still run.
    """
    factors = [p for module in modules.values() for p in (module.lora_A, module.lora_B)]
    wanted = [p for p in factors if p.requires_grad]  # a frozen factor scores as if its gradient were zero
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
    found = dict(zip(map(id, wanted), grads, strict=True))
    dense = [torch.zeros_like(p) if found.get(id(p)) is None else found[id(p)] for p in factors]
    totals = dict(into or {})
    for name, grad_a, grad_b in zip(modules, dense[0::2], dense[1::2], strict=True):
        if name in totals:
            grad_a, grad_b = totals[name][0] + grad_a, totals[name][1] + grad_b
        totals[name] = (grad_a, grad_b)
    return totals


def _each(batches: Sequence[dict], progress: bool, what: str):
    if not progress:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=f"{what} proxy", unit="batch")


def _accumulate(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[dict], progress: bool,
                what: str) -> Factors:
    """The candidates' factor gradients summed over the minibatches (G_A, G_B)."""
    totals: Factors = {}
    for batch in _each(batches, progress, what):
        totals = _factor_grads(_loss(model, batch), modules, totals)
    return totals


def grad_norm(model, modules, batches, seed, progress) -> dict[str, float]:
    grads = _accumulate(model, modules, batches, progress, "grad-norm")
    return {n: float(grads[n][0].norm() + grads[n][1].norm()) for n in modules}


def snip(model, modules, batches, seed, progress) -> dict[str, float]:
    with _probe(modules, seed):
        grads = _accumulate(model, modules, batches, progress, "snip")
        return {n: _weight_times_grad(m, grads[n]) for n, m in modules.items()}


def _token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[examples, tokens] float: 1 for real tokens, 0 for padding (the collated batches' attention mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        ids = batch["input_ids"]
        return torch.ones(ids.shape[:2])
    return mask.float()


def _bottleneck_hook(name: str, mask: torch.Tensor, sums: dict[str, torch.Tensor]):
    """A forward hook on a candidate: adds sum over tokens of z * dL/dz, per example and channel, to sums[name].

    z = A x is the rank-r bottleneck of the module's input x (dropout is off in evaluation mode), and
    dL/dz = scaling * gate * B^T dL/dy comes from the gradient of the module's output y (base + delta
    for a LoRA module, the delta alone for a shortcut), caught by a hook on y. With several experts
    each expert's bottleneck is its own r channels.
    """
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        examples, tokens = mask.shape
        x = args[0].detach()
        if x.shape[:-1].numel() != examples * tokens:
            raise AllocationError(f"the fisher proxy reads {name}'s input per example, but its shape "
                                  f"{tuple(x.shape)} is not [batch {examples}, tokens {tokens}, features]")
        a, b = module.lora_A.detach().float(), module.lora_B.detach().float()  # [E, r, in], [E, out, r]
        experts = a.shape[0]
        with torch.no_grad():
            x2 = x.reshape(-1, x.shape[-1])
            z = torch.einsum("ti,eri->ter", x2.float(), a)
            coef = torch.full((x2.shape[0], experts), float(module.scaling), device=x.device)
            if experts > 1:
                coef = coef * module.gates(x2).float()
            weight = (z * coef.unsqueeze(-1)) * mask.to(x.device).reshape(-1, 1, 1)

        def on_grad(grad: torch.Tensor) -> None:
            with torch.no_grad():
                dz = torch.einsum("to,eor->ter", grad.reshape(-1, grad.shape[-1]).float(), b)
                per_example = (weight * dz).reshape(examples, tokens, -1).sum(dim=1)  # [examples, E*r]
                sums[name] = sums[name] + per_example if name in sums else per_example

        output.register_hook(on_grad)

    return hook


def fisher(model, modules, batches, seed, progress) -> dict[str, float]:
    # Per example n and channel c: s_nc = sum_t z_ntc dL/dz_ntc over the real tokens; score 1/2 sum_c mean_n s_nc^2.
    # (Summed over the examples, s_nc is sum_i A_ci dL/dA_ci; squaring that sum, the per-minibatch form,
    # would add cross-example terms.) Hooks read it during the ordinary passes: k forward + k backward.
    totals = dict.fromkeys(modules, 0.0)
    examples = 0
    with _probe(modules, seed):
        for batch in _each(batches, progress, "fisher"):
            mask, sums = _token_mask(batch), {}
            handles = [m.register_forward_hook(_bottleneck_hook(n, mask, sums)) for n, m in modules.items()]
            try:
                _factor_grads(_loss(model, batch), modules)  # only to run the backward that the hooks read
            finally:
                for handle in handles:
                    handle.remove()
            for name, per_example in sums.items():
                totals[name] += 0.5 * float(per_example.double().square().sum())
            examples += mask.shape[0]
    return {name: total / examples for name, total in totals.items()}


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
            grads = _factor_grads(_loss(model, inputs), modules)
            scores = {n: _weight_times_grad(m, grads[n]) for n, m in modules.items()}
        finally:
            with torch.no_grad():
                for p, sign in zip(params, signs, strict=True):
                    p.mul_(sign)
    return scores


NO_FIT_SCORE = 0.0  # the alpha proxy's score without a usable fit: below every alpha (> 1), so ranked last


def spectral_alpha(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, float]:
    """Each LoRA candidate's base-weight alpha (AlphaLoRA's xmin_peak); shortcuts get their layer's mean.

    A candidate without a usable fit (too few eigenvalues, a flat spectrum) scores NO_FIT_SCORE;
    base weights with NaN or Inf values are refused.
    """
    from alphalora.spectral import analyze

    _refuse_non_finite_base_weights(modules)
    report = analyze(model, progress=False)
    by_name = {m.name.removesuffix(".base"): m.alpha for m in report.matrices if m.ok}
    by_layer = {layer.layer: layer.alpha for layer in report.layers if layer.alpha is not None}
    scores = {}
    for name in modules:
        shortcut = parse_shortcut(name)
        if shortcut is not None:
            scores[name] = by_layer.get(shortcut[0], NO_FIT_SCORE)
        else:
            scores[name] = by_name.get(name, NO_FIT_SCORE)
    return scores


def _refuse_non_finite_base_weights(modules: dict[str, nn.Module]) -> None:
    """A NaN/Inf base weight has no spectrum: ranking it last would hide a damaged model."""
    bases = {name: module.base.weight for name, module in modules.items() if hasattr(module, "base")}
    broken = [name for name, weight in bases.items() if not bool(torch.isfinite(weight.detach()).all())]
    if broken:
        raise AllocationError(f"the alpha proxy cannot score {len(broken)} candidate(s) whose base weights hold NaN "
                              f"or Inf values ({_first_names(broken)}); the model is damaged: use intact weights")


def _first_names(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_scores_finite(proxy: str, scores: dict[str, float]) -> None:
    """Refuses proxy scores that are NaN or Inf, which would leave the selection to the tie-break."""
    bad = [name for name, score in scores.items() if not math.isfinite(score)]
    if bad:
        raise AllocationError(
            f"the {proxy} proxy scored {len(bad)} of {len(scores)} candidates NaN or Inf ({_first_names(bad)}), "
            "so they cannot be ranked: the model's weights likely hold NaN/Inf values (`alphalora analyze MODEL` "
            "gives each matrix's status), or the loss is NaN/Inf (diverges) on the proxy minibatches; use intact "
            "weights, check the data, or pick another --proxy"
        )


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
