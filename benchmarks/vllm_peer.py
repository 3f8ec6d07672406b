"""The vLLM side of benchmarks/serving.py, run in an environment where `vllm` imports.

Reads a JSON job (model folder, prompts as token ids, one adapter name or none per request, PEFT
adapter folders, output length), runs vLLM's offline engine on all requests at once and prints a
JSON line with output tokens/s and per-request TTFT and TPOT (from vLLM's request metrics). Plain
LoRA jobs carry PEFT exports; a MoE-LoRA job names a baked model folder (the alphalora plugin).

    python benchmarks/vllm_peer.py job.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np  # (linear percentiles, as serving.py and `vllm bench serve` compute theirs)


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = job["adapters"]
    llm = LLM(model=job["model"], skip_tokenizer_init=True, enable_lora=bool(adapters),
              max_lora_rank=job.get("max_lora_rank", 8), max_loras=max(1, len(adapters)), max_model_len=512,
              gpu_memory_utilization=0.3, seed=0, max_num_seqs=len(job["prompts"]),
              max_num_batched_tokens=job.get("max_num_batched_tokens"), disable_log_stats=False,
              dtype=job.get("dtype", "auto"), enable_prefix_caching=job.get("enable_prefix_caching", True))
    params = SamplingParams(max_tokens=job["output"], min_tokens=job["output"], temperature=0.0, ignore_eos=True,
                            detokenize=False)
    ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}
    lora = [LoRARequest(name, ids[name], adapters[name]) if name in adapters else None for name in job["names"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    # Warm-up: two requests, and one for each adapter, which vLLM reads from disk on its first request (the native
    # engine's adapters are loaded before its timer starts too)
    first = {}
    for i, request in enumerate(lora):
        first.setdefault(request.lora_name if request is not None else None, i)
    warm = sorted({0, 1, *first.values()} & set(range(len(prompts))))
    llm.generate([prompts[i] for i in warm], params, lora_request=[lora[i] for i in warm], use_tqdm=False)
    llm.reset_prefix_cache()  # the timed run starts cold, as the native engine's does
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"output_tok_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens,
              "prefix_hit_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
              "prompt_tokens": sum(len(p) for p in job["prompts"]),
              "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch.")}
    # All requests are submitted at once, so each TTFT counts from the batch's start (as for the native engine).
    metrics = [o.metrics for o in outputs if o.metrics is not None and o.metrics.first_token_ts]
    if metrics:
        origin = min(m.queued_ts for m in metrics)
        ttft = [m.first_token_ts - origin for m in metrics]
        tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1) for m in metrics
                if m.num_generation_tokens > 1]
        result.update(ttft_p50=statistics.median(ttft), ttft_p99=float(np.percentile(ttft, 99)),
                      tpot_p50=statistics.median(tpot), tpot_p99=float(np.percentile(tpot, 99)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
