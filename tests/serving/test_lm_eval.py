"""lm-evaluation-harness's `local-completions` model runs a loglikelihood task against the server."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.serving.test_engine import _adapter
from tests.tiny_models import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from load_test import start_local_server  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "the cat sat on", "target": "the mat"},
    {"context": "the dog sat on", "target": "the log"},
    {"context": "one two three", "target": "four five"},
    {"context": "red green blue", "target": "yellow"},
]
TASK = """task: tiny_continuation
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: " {{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _reference_loglikelihood(model_dir, adapter, context: str, target: str) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alphalora.adapters.io import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_adapter(model, adapter)
    whole = tokenizer(context + " " + target)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_local_completions_loglikelihood_matches_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = save_tiny("llama", tmp_path / "m", initializer_range=0.2, max_position_embeddings=128)
    adapter = _adapter(tmp_path / "moe", "llama", (3, 2), seed=4)
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TASK.format(data=data))
    url, server, state = start_local_server(model_dir, {"moe": str(adapter)}, max_num_seqs=8)
    try:
        from lm_eval.tasks import TaskManager

        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=moe,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={model_dir},num_concurrent=1,max_retries=1",
            tasks=["tiny_continuation"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        )
    finally:
        server.should_exit = True
        state.engine.close()
    samples = results["samples"]["tiny_continuation"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        doc = sample["doc"]
        got = sample["resps"][0][0][0]
        want = _reference_loglikelihood(model_dir, adapter, doc["context"], doc["target"])
        assert math.isclose(got, want, abs_tol=1e-3), (doc, got, want)
    assert "acc,none" in results["results"]["tiny_continuation"]
