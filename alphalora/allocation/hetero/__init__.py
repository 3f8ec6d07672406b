"""HeteroLoRA: zero-cost proxies choose LoRA modules, ranks and shortcut connections under a parameter budget."""

from .budget import Candidate, parameters_used, select
from .proxies import PROXY_COST, score_candidates
from .search import allocate_hetero, candidates_of, first_minibatches, reallocate

__all__ = [
    "PROXY_COST",
    "Candidate",
    "allocate_hetero",
    "candidates_of",
    "parameters_used",
    "first_minibatches",
    "reallocate",
    "score_candidates",
    "select",
]
