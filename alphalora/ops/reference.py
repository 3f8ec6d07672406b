"""Pure-PyTorch references for every alphalora op.

They follow the published formulas literally (no pruning, no recurrences), so they serve as
the oracle the compiled kernels are tested against, and as the fallback where nothing was
compiled.
"""

from __future__ import annotations

import math

import torch


def _fit_row(x: torch.Tensor, lo: int, hi: int, min_tail: int, bias_corrected: bool):
    n = x.numel()
    hi = min(hi, n - 1)
    lo = max(lo, 0)
    nan = float("nan")
    if n < 2 or lo >= hi:
        return nan, nan, -1
    log_x = torch.log(x)
    candidates = torch.arange(lo, hi, device=x.device)
    tail = (n - candidates).to(torch.float64)
    # T_i = sum_{j>=i} (L_j - L_i) term by term: a difference of suffix sums would leave rounding noise
    # where the tail is constant (T_i = 0 exactly, alpha = inf, no fit).
    above = torch.arange(n, device=x.device)[None, :] >= candidates[:, None]
    s = torch.where(above, log_x[None, :] - log_x[candidates][:, None], torch.zeros((), dtype=x.dtype)).sum(1)
    if bias_corrected:
        alpha = 1.0 + (tail - 1.0) / s
        valid = s > 1e-12
    else:
        alpha = 1.0 + tail / s
        valid = torch.ones_like(alpha, dtype=torch.bool)
    valid &= (tail >= min_tail) & (alpha > 1.0) & torch.isfinite(alpha)
    # D_i over the full (candidate, tail offset) grid, masked beyond each tail.
    k = torch.arange(n, device=x.device, dtype=torch.float64)
    j = candidates[:, None] + k[None, :].long()
    in_tail = j < n
    log_ratio = log_x[j.clamp(max=n - 1)] - log_x[candidates][:, None]
    cdf = 1.0 - torch.exp((1.0 - alpha[:, None]) * log_ratio)
    terms = torch.where(in_tail, (cdf - k[None, :] / tail[:, None]).abs(), torch.zeros_like(cdf))
    distance = terms.amax(dim=1)
    distance = torch.where(valid, distance, torch.full_like(distance, math.inf))
    if not bool(valid.any()):
        return nan, nan, -1
    best = int(torch.argmin(distance))  # first minimum
    return float(alpha[best]), float(distance[best]), int(candidates[best])


def powerlaw_fit(
    evals: torch.Tensor,
    lengths: torch.Tensor,
    cand_lo: torch.Tensor,
    cand_hi: torch.Tensor,
    min_tail: int,
    bias_corrected: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact power-law fit of each row over candidates [cand_lo, cand_hi); see csrc/spectral."""
    if evals.dtype != torch.float64:
        raise RuntimeError(f"powerlaw_fit fits in float64; got {evals.dtype}")
    rows = [
        _fit_row(evals[b, : int(lengths[b])], int(cand_lo[b]), int(cand_hi[b]), min_tail, bias_corrected)
        for b in range(evals.shape[0])
    ]
    alpha = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=evals.device)
    distance = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=evals.device)
    index = torch.tensor([r[2] for r in rows], dtype=torch.int64, device=evals.device)
    return alpha, distance, index


def _peak_window_row(x: torch.Tensor, bins: int, log_lower_bound: bool) -> tuple[int, int]:
    # Transcribed from TempBalance's `net_esd_estimator` (fix_fingers='xmin_peak').
    n = x.numel()
    if n < 2:
        return 0, 0
    hist_values = torch.log10(x)
    min_e, max_e = hist_values.min(), hist_values.max()
    counts = torch.histc(hist_values, bins, min=float(min_e), max=float(max_e))
    boundaries = torch.linspace(min_e, max_e, bins + 1, dtype=x.dtype)
    peak = 10 ** boundaries[torch.argmax(counts)]
    lower = torch.log10(0.95 * peak) if log_lower_bound else 0.95 * peak
    upper = 1.5 * peak
    lo, hi = None, n - 1
    for i in range(n - 1):
        if x[i] < lower:
            continue
        if lo is None:
            lo = i
        if x[i] > upper:
            hi = i
            break
    if lo is None:
        return n - 1, n - 1
    return lo, hi


def xmin_peak_window(
    evals: torch.Tensor, lengths: torch.Tensor, bins: int, log_lower_bound: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate window [lo, hi) of the xmin_peak estimator for each row."""
    windows = [
        _peak_window_row(evals[b, : int(lengths[b])].cpu(), bins, log_lower_bound)
        for b in range(evals.shape[0])
    ]
    lo = torch.tensor([w[0] for w in windows], dtype=torch.int64, device=evals.device)
    hi = torch.tensor([w[1] for w in windows], dtype=torch.int64, device=evals.device)
    return lo, hi


def eigvalsh_batched(grams: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of each symmetric matrix in a (batch, n, n) tensor."""
    return torch.linalg.eigvalsh(grams)


# --- mixture-of-LoRA-experts routing: every pair computed on its own, no grouping -------------


def moe_permute(expert_ids: torch.Tensor, num_experts: int, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted (stably) by expert, and each expert's [start, end) in that order. The ids are
    always range-checked here (`validate` only lets GPU kernels skip the host synchronisation)."""
    if expert_ids.numel() and not 0 <= int(expert_ids.min()) <= int(expert_ids.max()) < num_experts:
        raise RuntimeError(f"expert ids outside [0, {num_experts}) in moe_permute")
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return order, offsets


def _tokens(pairs: int, num_tokens: int, device) -> torch.Tensor:
    # Pair p = t * k + j belongs to token t; no tokens means no pairs (k is then undefined).
    return torch.arange(pairs, device=device) // max(1, pairs // max(1, num_tokens))


# The grouped ops sum in float32 for float32 and the 16-bit types and in float64 for float64, and round
# each output to the input dtype once, as the kernels do (csrc/routing: the CPU pair loops and GEMMs, the
# CUDA kernels). The one intermediate rounded to the input dtype is expand_backward's B^T grad_y (`back`
# below), which the kernels store in the input dtype before they scale it by the gates; the shrink's
# output h is an op output, so it is rounded before the expand reads it (as in PEFT and Punica).


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_order(order: torch.Tensor, offsets: torch.Tensor, pairs: int, op: str) -> None:
    """Refuse what moe_permute never makes, as the CPU kernels do (these references read neither tensor).
    One host synchronisation when all is well."""
    entries_ok = ((order >= 0) & (order < pairs)).all()
    offsets_ok = (offsets[0] == 0) & (offsets[-1] == pairs) & (offsets[1:] >= offsets[:-1]).all()
    if bool(entries_ok & offsets_ok):
        return
    if not bool(entries_ok):
        q = int(((order < 0) | (order >= pairs)).nonzero()[0, 0])
        raise RuntimeError(f"{op}: order entry {int(order[q])} at position {q} is outside [0, {pairs}) "
                           "(order must list the pairs, from moe_permute)")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0 or last != pairs:
        raise RuntimeError(f"{op}: offsets must run from 0 to the number of pairs ({pairs}), got {first} to {last} "
                           "(from moe_permute)")
    raise RuntimeError(f"{op}: offsets must not decrease (from moe_permute)")


def grouped_lora_shrink(x, A, expert_ids, order, offsets) -> torch.Tensor:
    """h[p] = A[e_p] @ x[t_p]."""
    _check_order(order, offsets, expert_ids.numel(), "grouped_lora_shrink")
    acc = _acc(x)
    tokens = _tokens(expert_ids.numel(), x.shape[0], x.device)
    return torch.bmm(A[expert_ids].to(acc), x[tokens].to(acc).unsqueeze(2)).squeeze(2).to(x.dtype)


def grouped_lora_expand(h, B, gates, expert_ids, order, offsets, num_tokens) -> torch.Tensor:
    """y[t] = sum over the token's pairs of gates[p] * B[e_p] @ h[p]."""
    _check_order(order, offsets, expert_ids.numel(), "grouped_lora_expand")
    acc = _acc(h)
    tokens = _tokens(expert_ids.numel(), num_tokens, h.device)
    contributions = torch.bmm(B[expert_ids].to(acc), h.to(acc).unsqueeze(2)).squeeze(2) * gates.to(acc).unsqueeze(1)
    y = torch.zeros(num_tokens, B.shape[1], dtype=acc, device=h.device).index_add_(0, tokens, contributions)
    return y.to(h.dtype)


def grouped_lora_shrink_backward(grad_h, x, A, expert_ids, order, offsets):
    _check_order(order, offsets, expert_ids.numel(), "grouped_lora_shrink_backward")
    acc = _acc(x)
    tokens = _tokens(expert_ids.numel(), x.shape[0], x.device)
    gh = grad_h.to(acc)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device).index_add_(
        0, tokens, torch.bmm(A[expert_ids].to(acc).transpose(1, 2), gh.unsqueeze(2)).squeeze(2))
    grad_A = torch.zeros(A.shape, dtype=acc, device=A.device).index_add_(
        0, expert_ids, gh.unsqueeze(2) * x[tokens].to(acc).unsqueeze(1))
    return grad_x.to(x.dtype), grad_A.to(A.dtype)


def grouped_lora_expand_backward(grad_y, h, B, gates, expert_ids, order, offsets):
    _check_order(order, offsets, expert_ids.numel(), "grouped_lora_expand_backward")
    acc = _acc(h)
    tokens = _tokens(expert_ids.numel(), grad_y.shape[0], grad_y.device)
    gy = grad_y[tokens].to(acc)
    g = gates.to(acc).unsqueeze(1)
    back = torch.bmm(B[expert_ids].to(acc).transpose(1, 2), gy.unsqueeze(2)).squeeze(2).to(h.dtype).to(acc)
    grad_B = torch.zeros(B.shape, dtype=acc, device=B.device).index_add_(
        0, expert_ids, (gy * g).unsqueeze(2) * h.to(acc).unsqueeze(1))
    return (back * g).to(h.dtype), grad_B.to(B.dtype), (back * h.to(acc)).sum(1).to(h.dtype)


def stable_top_k(values: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of the last dimension, largest first, equal values by lower index: the rule of the
    routing kernels (`router_gates`, `select_experts`), which the training layer's routing follows too
    (alphalora.adapters.routing), so every path picks the same experts. (torch.topk leaves the order of
    ties to the implementation: on the CPU [2, 2, 2, 0] gives experts 1 and 2.) NaN ranks below every
    number (-inf included) and is returned as -inf, as the kernels do: a NaN logit is never chosen
    while a number is left, and gets gate 0 if it is. Differentiable in `values`, like topk."""
    ranked = values.masked_fill(values.isnan(), float("-inf"))  # NaN ranks below every number, as in the kernels
    ordered, order = torch.sort(ranked, dim=-1, descending=True, stable=True)
    return ordered[..., :top_k], order[..., :top_k]


def router_gates(hidden, logits, top_k, scaling):
    """The dense-masked path's router: (hidden * scaling * gate per expert, dense float32 gates, ids)."""
    tokens, experts = logits.shape
    top, ids = stable_top_k(logits.float(), top_k)
    gates = torch.zeros(tokens, experts, dtype=torch.float32, device=logits.device)
    gates.scatter_(1, ids, torch.softmax(top, dim=-1))
    scaled = (gates * scaling).repeat_interleave(hidden.shape[1] // experts, dim=1)
    return (hidden.float() * scaled).to(hidden.dtype), gates, ids


def router_gates_backward(grad_gated, hidden, gates, grad_logits, scaling):
    """[d hidden | d logits] of router_gates: g = softmax(top-k logits) has the softmax Jacobian over
    the chosen experts and none elsewhere (gates are zero there)."""
    tokens, experts = gates.shape
    rank = hidden.shape[1] // experts
    grad = grad_gated.float().view(tokens, experts, rank)
    grad_gate = (grad * hidden.float().view(tokens, experts, rank)).sum(-1) * scaling
    grad_logit = gates * (grad_gate - (gates * grad_gate).sum(-1, keepdim=True))
    if grad_logits is not None:
        grad_logit = grad_logit + grad_logits.float()
    grad_hidden = (grad * (gates * scaling)[:, :, None]).view(tokens, experts * rank)
    return torch.cat([grad_hidden, grad_logit], dim=1).to(hidden.dtype)


def select_experts(logits, member, scale, base, num_experts, top_k):
    """Each token's own router block of logits, its top-k (softmax over them, times scale; ids + base)."""
    tokens = logits.shape[0]
    routers = logits.shape[1] // num_experts  # (-1 would be ambiguous with no tokens)
    own = logits.view(tokens, routers, num_experts)[torch.arange(tokens, device=logits.device), member]
    top, ids = stable_top_k(own.float(), top_k)
    return torch.softmax(top, dim=-1) * scale[:, None], ids + base[:, None]


# --- serving: decode attention over the paged KV cache -----------------------------------------


def paged_decode_attention(q, k_cache, v_cache, slots, lengths, starts, scale) -> torch.Tensor:
    """Gather each row's context from the cache, then masked softmax attention (GQA by repetition)."""
    batch, heads, dim = q.shape
    positions = torch.arange(slots.shape[1], device=q.device)
    allowed = (positions[None, :] >= starts[:, None]) & (positions[None, :] < lengths[:, None])  # [B, W]
    group = heads // k_cache.shape[1]
    keys = k_cache[slots].repeat_interleave(group, dim=2).float()  # [B, W, H, D]
    values = v_cache[slots].repeat_interleave(group, dim=2).float()
    scores = torch.einsum("bhd,bwhd->bhw", q.float(), keys) * scale
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    # A row with no context gives zeros; NaN or inf in q, keys or values propagate as in the CPU kernel
    # (nan_to_num here turned them into silent zeros and clipped infinities).
    weights = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(1)[:, None, None], 0.0)
    return torch.einsum("bhw,bwhd->bhd", weights, values).to(q.dtype)
