"""Block index and role (q, k, v, o, gate, up, down, ...) of a weight from its module name."""

from __future__ import annotations

import re
from collections.abc import Iterable

# The order roles are listed in tables and plans: attention, then MLP (a mixture of experts' router first).
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "router", "gate", "up", "gate_up", "down")


def ordered_roles(roles: Iterable[str]) -> list[str]:
    """`roles` once each, in ROLE_ORDER, then any others alphabetically."""
    found = set(roles)
    return [r for r in ROLE_ORDER if r in found] + sorted(found - set(ROLE_ORDER))


def is_projection(shape: Iterable[int]) -> bool:
    """False for a scalar gate (Qwen2-MoE's shared_expert_gate, hidden -> 1): no rank fits it, no adapter wraps it."""
    return min(shape) > 1

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# Name suffixes (module path, without ".weight") -> role; the first match wins, so longer,
# more specific suffixes come first.
_ROLE_SUFFIXES: list[tuple[str, str]] = [
    # BERT / RoBERTa
    ("attention.self.query", "q"),
    ("attention.self.key", "k"),
    ("attention.self.value", "v"),
    ("attention.output.dense", "o"),
    ("intermediate.dense", "up"),
    ("output.dense", "down"),
    # GPT-2 (Conv1D)
    ("attn.c_attn", "qkv"),
    ("attn.c_proj", "o"),
    ("mlp.c_fc", "up"),
    ("mlp.c_proj", "down"),
    # Llama, Mistral, Qwen2, Gemma, Phi and friends
    ("q_proj", "q"),
    ("k_proj", "k"),
    ("v_proj", "v"),
    ("o_proj", "o"),
    ("out_proj", "o"),
    ("qkv_proj", "qkv"),
    ("query_key_value", "qkv"),
    ("gate_up_proj", "gate_up"),
    ("gate_proj", "gate"),
    ("up_proj", "up"),
    ("down_proj", "down"),
    ("dense_h_to_4h", "up"),
    ("dense_4h_to_h", "down"),
    ("fc1", "up"),
    ("fc2", "down"),
    ("query", "q"),
    ("key", "k"),
    ("value", "v"),
]

# Leaf names of input/output embeddings, LM heads and other lookup tables (T5's per-bucket attention
# biases: buckets x heads, not a linear map), left out unless asked for.
EMBEDDING_LEAVES = frozenset(
    {"wte", "wpe", "lm_head", "embed_out", "shared", "embed_tokens", "word_embeddings",
     "position_embeddings", "token_type_embeddings", "embed_positions", "relative_attention_bias"}
)

# GPT-2-style Conv1D modules store their weight as (in, out).
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


# Mixture-of-experts blocks hold their experts in a module named `experts` (a ModuleList of per-expert MLPs, or
# one module of fused 3-D parameters) and beside it the router that picks them, named `gate` or `router`.
EXPERTS_MODULE = "experts"
ROUTER_LEAVES = frozenset({"gate", "router"})

# One expert's matrix: `<experts module>.<expert index>.<leaf>` (a checkpoint's per-expert tensors, or this
# package's name for one expert of a fused 3-D parameter, e.g. `mlp.experts.3.gate_proj`).
_EXPERT_MATRIX = re.compile(r"(?:^|\.)experts\.(\d+)\.([^.]+)$")
# The original Mixtral checkpoint format (`block_sparse_moe.experts.N.w1`): w1 gate, w2 down, w3 up; these
# leaves mean that inside an experts module only, so no other model's `w1` changes meaning.
_MIXTRAL_EXPERT_LEAVES = {"w1": "gate", "w2": "down", "w3": "up"}


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to, or None (embeddings, heads, poolers)."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def block_stack(name: str) -> str | None:
    """The stack of blocks a module belongs to, e.g. "model.layers" or "encoder.block"; None outside blocks."""
    match = _BLOCK_INDEX.search(name)
    return name[: match.start(1) - 1].lstrip(".") if match else None


def role_of(name: str) -> str:
    """The matrix's role in its block, e.g. 'q' or 'down'; the module's own name otherwise.

    A mixture of experts' router is told from a dense `gate` by its place beside the experts, which a name alone
    does not show: see `is_router`."""
    expert = _EXPERT_MATRIX.search(name)
    if expert is not None and expert.group(2) in _MIXTRAL_EXPERT_LEAVES:
        return _MIXTRAL_EXPERT_LEAVES[expert.group(2)]
    for suffix, role in _ROLE_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return role
    return name.rsplit(".", 1)[-1]


def expert_index(name: str) -> int | None:
    """The expert a matrix belongs to (`...experts.<index>.<leaf>`), or None outside a mixture of experts."""
    match = _EXPERT_MATRIX.search(name)
    return int(match.group(1)) if match else None


def moe_block_of(name: str) -> str | None:
    """The block that holds the experts module `name` is or is inside of (`model.layers.0.mlp` for
    `model.layers.0.mlp.experts`, `...mlp.experts.gate_up_proj` or `...mlp.experts.3.w1.weight`); None elsewhere."""
    parts = name.split(".")
    if EXPERTS_MODULE not in parts:
        return None
    return ".".join(parts[: parts.index(EXPERTS_MODULE)])


def moe_blocks(names: Iterable[str]) -> set[str]:
    """The blocks that hold experts, from the names of a model's modules or tensors (`moe_block_of`)."""
    return {block for name in names if (block := moe_block_of(name)) is not None}


def is_router(name: str, expert_blocks: set[str]) -> bool:
    """Whether a module is a mixture of experts' router: a `gate` or `router` in a block that holds experts
    (`expert_blocks`, see `moe_blocks`): `mlp.gate` of Mixtral, Qwen-MoE, OLMoE and DeepSeek,
    `block_sparse_moe.gate`, GPT-OSS's `mlp.router`."""
    parent, _, leaf = name.rpartition(".")
    return leaf in ROUTER_LEAVES and parent in expert_blocks


def is_embedding_name(name: str) -> bool:
    """Whether a module name is an embedding table or an LM head."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in EMBEDDING_LEAVES or "embedding" in leaf
