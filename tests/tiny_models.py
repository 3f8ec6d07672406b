"""Tiny transformers models of each supported family, built from configs with random weights."""

from __future__ import annotations

import torch
import transformers

COMMON_DECODER = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, COMMON_DECODER),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, COMMON_DECODER),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, COMMON_DECODER),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(COMMON_DECODER, head_dim=8)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "bert": (transformers.BertConfig, transformers.BertModel,
             dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)),
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel,
                dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=70)),
}

# The roles each family's blocks must expose.
EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma": {"q", "k", "v", "o", "gate", "up", "down"},
    "gpt2": {"qkv", "o", "up", "down"},
    "bert": {"q", "k", "v", "o", "up", "down"},
    "roberta": {"q", "k", "v", "o", "up", "down"},
}


def build(family: str, seed: int = 0):
    config_class, model_class, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config_class(**kwargs)).eval()
