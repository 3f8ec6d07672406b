"""What differs between the served decoder families, read off the model's config and its own modules.

The runner's step is the Llama block; the families differ in where a layer attends (sliding windows,
per layer or for all), how positions rotate (one rotary embedding, one per layer type as in Gemma 3, or
LongRoPE's length-dependent factors), whether attention logits are soft-capped (Gemma 2), whether each
sub-block's output is normalised before the residual add (Gemma 2 and 3) and whether a block's MLP is a
mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE: run as the model's own module, without adapters).
"""

from __future__ import annotations

import inspect
import sys

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                         "mixtral", "qwen2_moe", "qwen3_moe")
# Families whose every layer attends within `config.sliding_window` when it is set (others say so per layer,
# in `config.layer_types`).
EVERY_LAYER_SLIDING = ("mistral", "phi3", "mixtral")
# Rotary embeddings whose frequencies `transformers` picks by the longest position in the call (LongRoPE: the
# long factors past original_max_position_embeddings, re-encoding the whole cache when a sequence crosses it).
# Served as vLLM serves them: fixed by max_model_len (long factors iff it exceeds the original context), so a
# request's output does not depend on its neighbours in the batch nor on how long it has grown.
FIXED_BY_MAX_MODEL_LEN_ROPE = ("longrope",)


def check_servable(config) -> None:
    """A clear error for a model the runner would compute wrongly."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        from alphalora.training.model import is_encoder

        encoder = " (an encoder such as BERT is analysed and trained for classification, not served)" \
            if is_encoder(config) else ""
        raise ValueError(f"model type {config.model_type!r} is not served: the engine generates with the decoder "
                         f"families {', '.join(SUPPORTED_MODEL_TYPES)}; serve a model of one of them{encoder}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("this model attends bidirectionally (use_bidirectional_attention: an embedding model), "
                         "which a generating server does not run")
    attention_windows(config)


def attention_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model's own attention modules read it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window if config.model_type in EVERY_LAYER_SLIDING else None] * config.num_hidden_layers
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"layer types {sorted(unknown)} (config.layer_types) are not served: only full and sliding "
                         "window attention")
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def rotary_function(attention: torch.nn.Module):
    """The model's own `apply_rotary_pos_emb` (Phi-3's rotates only the first `partial_rotary_factor` of a head)."""
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb


class RotaryEmbeddings:
    """Each layer's rotary (cos, sin) [1, tokens, rotary dim] at a step's positions, from the model's own
    rotary embedding: one for every layer, or one per layer type (Gemma 3: local and global frequencies)."""

    def __init__(self, decoder: torch.nn.Module, config, max_model_len: int, like: torch.Tensor):
        self.rotary = decoder.rotary_emb
        per_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.layer_keys = list(config.layer_types) if per_type else [None] * config.num_hidden_layers
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        self.table = None  # (cos, sin) [1, max_model_len, rotary dim] where fixed by max_model_len
        if not per_type and rope.get("rope_type", rope.get("type")) in FIXED_BY_MAX_MODEL_LEN_ROPE:
            with torch.no_grad():
                self.table = self.rotary(like[:1], torch.arange(max_model_len, device=like.device)[None])

    def step(self, hidden: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of every layer, computed once per distinct rotary."""
        if self.table is not None:
            shared = tuple(table[:, positions] for table in self.table)
            return [shared] * len(self.layer_keys)
        computed = {key: (self.rotary(hidden[None], positions[None]) if key is None
                          else self.rotary(hidden[None], positions[None], key))
                    for key in dict.fromkeys(self.layer_keys)}
        return [computed[key] for key in self.layer_keys]


def softcapped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                         scale: float, softcap: float) -> torch.Tensor:
    """Attention with soft-capped logits (Gemma 2: cap * tanh(logits / cap) before the mask), computed as
    transformers' eager attention does: logits in the model's dtype, softmax in float32.

    query [B, heads, Q, D]; keys and values [B, kv heads, W, D]; mask [B, 1, Q, W], True where attended."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    logits = torch.tanh(query @ keys.transpose(-1, -2) * scale / softcap) * softcap
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype) @ values
