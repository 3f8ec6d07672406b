"""The default KV pool: max_num_seqs full-length sequences where memory allows, else what fits (with a
warning), and a refusal naming the context that fits where not one full-length sequence does."""

from __future__ import annotations

import pytest
import torch

from alphalora.serving.engine import Engine, EngineConfig, SamplingParams, kv_pool
from tests.serving.test_engine import _base, _hf_greedy

GIB = 2**30


def _llama_7b_config():
    import transformers

    return transformers.LlamaConfig()  # 32 layers, 32 KV heads of 128: 16 tokens x 512 KiB = 8 MiB a block in bf16


def test_a_block_holds_keys_and_values_of_every_layer():
    config = _llama_7b_config()
    assert kv_pool.bytes_per_block(config, 16, torch.bfloat16) == 2 * 32 * 16 * 32 * 128 * 2 == 8 * 2**20
    tiny = _base("llama").config  # 2 layers, grouped-query attention: its KV heads, not its query heads
    head_dim = tiny.hidden_size // tiny.num_attention_heads
    assert kv_pool.bytes_per_block(tiny, 4, torch.float32) == 2 * 2 * 4 * tiny.num_key_value_heads * head_dim * 4


def test_the_default_is_max_num_seqs_full_sequences_where_memory_allows():
    blocks = kv_pool.default_num_blocks(_llama_7b_config(), 4096, 16, 8, torch.bfloat16, "cuda", free=80 * GIB)
    assert blocks == 8 * 256  # 8 sequences x 256 blocks: 16 GiB of the 72 GiB share


def test_a_long_context_gets_what_fits_with_a_warning(caplog):
    """Llama 3.1's 131072 positions, 32 sequences: 512 GiB wanted; 72 GiB of an 80 GiB H100 hold 9216 blocks."""
    with caplog.at_level("WARNING", logger="alphalora.serving"):
        blocks = kv_pool.default_num_blocks(_llama_7b_config(), 131072, 16, 32, torch.bfloat16, "cuda",
                                            free=80 * GIB)
    assert blocks == int(80 * GIB * 0.9) // (8 * 2**20) == 9216
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "9216 blocks (1 sequences of the full 131072 tokens" in warning and "--max-model-len" in warning


def test_not_one_full_sequence_is_refused_naming_the_context_that_fits():
    with pytest.raises(ValueError, match=r"needs 64.0 GiB, more than the 7.2 GiB .* pass --max-model-len 14736 "):
        kv_pool.default_num_blocks(_llama_7b_config(), 131072, 16, 32, torch.bfloat16, "cuda", free=8 * GIB)


def test_an_engine_on_a_small_memory_serves_in_the_pool_that_fits(monkeypatch):
    """Room for 3 of 8 full-length sequences: the pool has their blocks, and 8 requests all equal generate
    (the scheduler waits for room)."""
    model = _base("llama")
    block = kv_pool.bytes_per_block(model.config, 4, torch.float32)
    per_sequence = -(-model.config.max_position_embeddings // 4)
    monkeypatch.setattr(kv_pool, "free_memory", lambda device: int(3.5 * per_sequence * block / kv_pool.CPU_SHARE))
    engine = Engine(model, tokenizer=None, config=EngineConfig(block_size=4, max_num_seqs=8))
    assert engine.blocks.num_blocks == int(3.5 * per_sequence)
    prompts = [[5 + i, 9, 17, 33] for i in range(8)]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert [s.output_ids for s in seqs] == [_hf_greedy("llama", p, 3) for p in prompts]
    assert EngineConfig(num_blocks=7).num_blocks == 7  # an explicit pool is taken as given
