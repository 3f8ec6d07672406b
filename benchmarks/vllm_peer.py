"""The vLLM side of benchmarks/serving.py, run in an environment where `vllm` imports.

Reads a JSON job (model folder, prompts as token ids, one adapter name or none per request, PEFT
adapter folders, output length), runs vLLM's offline `LLM.generate` on all requests at once and
prints a JSON line with output tokens/s. vLLM serves plain LoRA only, so jobs carry PEFT exports.

    python benchmarks/vllm_peer.py job.json
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = job["adapters"]
    llm = LLM(model=job["model"], skip_tokenizer_init=True, enable_lora=bool(adapters), max_lora_rank=8,
              max_loras=max(1, len(adapters)), max_model_len=512, gpu_memory_utilization=0.3, seed=0,
              max_num_seqs=len(job["prompts"]))
    params = SamplingParams(max_tokens=job["output"], min_tokens=job["output"], temperature=0.0, ignore_eos=True,
                            detokenize=False)
    ids = {name: i + 1 for i, name in enumerate(sorted(adapters))}
    lora = [LoRARequest(name, ids[name], adapters[name]) if name else None for name in job["names"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    llm.generate(prompts[:2], params, lora_request=lora[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"output_tok_s": tokens / elapsed, "seconds": elapsed, "tokens": tokens}))


if __name__ == "__main__":
    main()
