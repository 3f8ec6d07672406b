"""Token-level softmax top-k routing (MoLA) and the Switch-style load-balancing statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alphalora.ops.reference import stable_top_k  # the routing kernels' top-k: equal logits by lower expert


def renormalised_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates [T, k] in fp32, expert ids [T, k]): the top-k of the softmax over experts, renormalised
    to sum to 1, computed as what it equals, the softmax over the top-k logits alone (two small ops
    where the whole softmax, top-k and renormalisation take five; its gradient is zero off the top-k)."""
    top, ids = stable_top_k(logits.float(), top_k)
    return torch.softmax(top, dim=-1), ids


def top_k_gates(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in fp32, the top-k per token, renormalised to sum to 1 (by default).

    Returns (gates [T, k] in fp32, expert ids [T, k]), largest first, equal logits by lower expert.
    """
    if renormalize:
        return renormalised_top_k(logits, top_k)
    return stable_top_k(torch.softmax(logits.float(), dim=-1), top_k)


def dense_gates(gates: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] gates and ids -> [T, E] with zeros for the experts a token was not routed to."""
    return torch.zeros(gates.shape[0], num_experts, dtype=gates.dtype, device=gates.device).scatter(1, ids, gates)


@dataclass
class BalanceStatistics:
    """One layer's routing statistics for the load-balancing loss, gathered over its modules.

    MoLA concatenates the router logits of all adapted modules of a layer along the token axis;
    summing over modules here computes the same P (mean router probability) and f (share of
    top-k selections) per expert.
    """

    num_experts: int
    prob_sum: torch.Tensor | None = None  # [E], differentiable
    selections: torch.Tensor | None = None  # [E], counts
    rows: int = 0
    picks: int = 0
    without_grad: bool = False  # some logits came from a forward without autograd (reentrant checkpointing's)

    def add(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.without_grad = self.without_grad or not torch.is_grad_enabled()
        probs = torch.softmax(logits.float(), dim=-1)
        picked = ids.reshape(-1)
        # (scatter_add_, not bincount: on a GPU bincount reads the ids' range back to size its output, a host
        # synchronisation per adapted module per forward)
        counts = probs.new_zeros(self.num_experts).scatter_add_(0, picked, probs.new_ones(picked.shape))
        self.prob_sum = probs.sum(0) if self.prob_sum is None else self.prob_sum + probs.sum(0)
        self.selections = counts if self.selections is None else self.selections + counts
        self.rows += probs.shape[0]
        self.picks += ids.numel()

    def loss(self) -> torch.Tensor | None:
        """E * sum_i f_i * P_i (1.0 at perfect balance), or None if nothing was routed."""
        if self.prob_sum is None or self.rows == 0:
            return None
        mean_prob = self.prob_sum / self.rows
        share = self.selections / self.picks
        return self.num_experts * (share * mean_prob).sum()

    def __getstate__(self):
        # (copy.deepcopy, pickling: the statistics of a forward in progress belong to its graph, not to a copy)
        return {**self.__dict__, "prob_sum": None, "selections": None, "rows": 0, "picks": 0, "without_grad": False}

    def reset(self) -> None:
        self.prob_sum, self.selections, self.rows, self.picks = None, None, 0, 0
        self.without_grad = False
