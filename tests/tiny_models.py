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
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(COMMON_DECODER, head_dim=8)),
    # fused qkv_proj and gate_up_proj; special token ids inside the tiny vocabulary (the tokenizer's)
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(COMMON_DECODER, pad_token_id=0, bos_token_id=2, eos_token_id=3)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "bert": (transformers.BertConfig, transformers.BertModel,
             dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)),
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel,
                dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=70)),
    # pre-LN, as OPT-125m and 1.3B+; do_layer_norm_before=False builds the post-LN OPT-350M (HeteroLoRA's model)
    "opt": (transformers.OPTConfig, transformers.OPTForCausalLM,
            dict(vocab_size=128, hidden_size=32, ffn_dim=48, word_embed_proj_dim=32, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)),
}

# Families whose blocks normalise each sub-block's output before the residual add (Gemma 2 and 3): served, but
# without HeteroLoRA's shortcut connections, which add into those sums (so not in FAMILIES).
NORMED_BLOCK_FAMILIES = {
    # eager: the attention that applies Gemma 2's logit soft cap (transformers up to 5.17 ran Gemma 2 through sdpa
    # by default, which leaves the cap out)
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(COMMON_DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                    attn_implementation="eager")),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(COMMON_DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                    layer_types=["sliding_attention", "full_attention"])),
}

# Mixture-of-experts decoders (4 experts, 2 a token): served with adapters on their attention and dense MLPs.
_MOE = dict(COMMON_DECODER, num_experts_per_tok=2)
MOE_FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(_MOE, num_local_experts=4)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(_MOE, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=24)),
    # layer 0 a dense MLP (mlp_only_layers), layer 1 a mixture
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(_MOE, head_dim=8, num_experts=4, moe_intermediate_size=24, mlp_only_layers=[0])),
}

# The roles each family's blocks must expose.
EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "gemma": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen3": {"q", "k", "v", "o", "gate", "up", "down"},
    "phi3": {"qkv", "o", "gate_up", "down"},
    "gpt2": {"qkv", "o", "up", "down"},
    "bert": {"q", "k", "v", "o", "up", "down"},
    "roberta": {"q", "k", "v", "o", "up", "down"},
    "opt": {"q", "k", "v", "o", "up", "down"},
}


def build(family: str, seed: int = 0, **overrides):
    config_class, model_class, kwargs = {**FAMILIES, **NORMED_BLOCK_FAMILIES, **MOE_FAMILIES}[family]
    torch.manual_seed(seed)
    return model_class(config_class(**{**kwargs, **overrides})).eval()


CORPUS = [
    "the cat sat on the mat", "the dog sat on the log", "a bird sang in the tree", "one two three four five",
    "red green blue yellow", "question answer yes no", "add two and three makes five",
]


def tiny_tokenizer(kind: str = "llama"):
    """A word-level tokenizer trained offline on a toy corpus, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "[CLS]", "[SEP]"]
    tokenizer.train_from_iterator(CORPUS * 3, trainers.WordLevelTrainer(special_tokens=specials, vocab_size=120))
    if kind == "bert":
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>", model_max_length=64)


def save_tiny(family: str, folder, seed: int = 0, **overrides):
    """A tiny model of `family` with its tokenizer, saved like a hub checkpoint.

    Training tests pass a large initializer_range: with the default 0.02 a frozen random LM head
    of width 32 caps the logits near 0.6, and no adapter could lower the loss below ~ln(vocab).
    """
    tokenizer = tiny_tokenizer("bert" if family in ("bert", "roberta") else "llama")
    model = build(family, seed, **overrides)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def with_random_adapter(model, plan, seed: int = 0, std: float = 0.1):
    """Builds `plan` into `model` and fills the adapter with random weights (B included, so the
    adapter changes the output); returns the model in eval mode."""
    from alphalora.adapters import adapter_parameters, inject_adapters

    inject_adapters(model, plan)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_parameters(model).values():
            parameter.normal_(0, std)
    return model.eval()


def save_word_model(folder, chat_template: str | None = None):
    """A tiny Llama whose vocabulary is the tiny tokenizer's, so every token has text (the HTTP tests'
    model), saved with `chat_template` as its tokenizer's template."""
    from transformers import AutoTokenizer

    save_tiny("llama", folder, initializer_range=0.2, max_position_embeddings=128, vocab_size=len(tiny_tokenizer()))
    if chat_template is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(folder)
    return folder
