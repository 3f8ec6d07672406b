"""Block index and role (q, k, v, o, gate, up, down, ...) of a weight from its module name."""

from __future__ import annotations

import re

# The order roles are listed in tables and plans: attention, then MLP.
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")

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


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to, or None (embeddings, heads, poolers)."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def block_stack(name: str) -> str | None:
    """The stack of blocks a module belongs to, e.g. "model.layers" or "encoder.block"; None outside blocks."""
    match = _BLOCK_INDEX.search(name)
    return name[: match.start(1) - 1].lstrip(".") if match else None


def role_of(name: str) -> str:
    """The matrix's role in its block, e.g. 'q' or 'down'; the module's own name otherwise."""
    for suffix, role in _ROLE_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return role
    return name.rsplit(".", 1)[-1]


def is_embedding_name(name: str) -> bool:
    """Whether a module name is an embedding table or an LM head."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in EMBEDDING_LEAVES or "embedding" in leaf
