"""The benchmark scripts that `benchmarks/gpu_checks.sh` runs on a lent GPU, run here on the CPU at toy sizes:
each must finish and write the JSON fields the issues ask for, so that a GPU session's few minutes are not
spent on a script an earlier change broke. (Their numbers at these sizes mean nothing and are not checked
beyond being finite and positive; the measurements live in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TOY_RUNS = {
    "moe_lora": ["--hidden", "64", "--tokens", "64", "--repeats", "1", "--many-experts", "8", "--many-rank", "8",
                 "--model-layers", "2", "--model-hidden", "64", "--batch", "2", "--seq", "16", "--model-repeats", "1",
                 "--sections", "layer,many,model,forms"],
    "serving": ["--layers", "2", "--hidden", "64", "--requests", "8", "--output", "4", "--hf-requests", "2"],
    "moe_lora_profile": ["--hidden", "64", "--tokens", "64", "--model-layers", "2", "--model-hidden", "64",
                         "--batch", "2", "--seq", "16", "--calls", "1", "--adapter-first", "--token-splits", "2"],
    "serving_profile": ["--layers", "2", "--hidden", "64", "--requests", "4", "--calls", "1"],
    # 600 tokens: split-K (slices of 256 tokens at the least) takes two slices and a remainder
    "adapter_products": ["--hidden", "64", "--tokens", "600", "--repeats", "1"],
    "paged_attention": ["--sequences", "4", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--min-context",
                        "5", "--max-context", "40", "--repeats", "1"],
}


def _run(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *TOY_RUNS[script],
                             "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_moe_lora_benchmark_writes_the_layer_ratio_and_step_rates(tmp_path):
    results = _run("moe_lora", tmp_path)
    # (a ratio of differences of toy timings: its sign is noise on a busy machine; its being computed is the point)
    assert math.isfinite(results["adapter_overhead_ratio"]) and _positive(results["adapter_roofline_fraction"])
    assert set(results["step_tokens_per_s"]) == {"lora_r8", "moe_lora", "moe_lora_loop"}
    assert all(_positive(rate) for rate in results["step_tokens_per_s"].values())
    assert math.isfinite(results["layer"]["adapter_roofline_fraction_back_to_back"])
    assert len(results["forms"]["forms"]) == 8 and results["forms"]["best"] in results["forms"]["forms"]
    assert all(math.isfinite(row["roofline_fraction_back_to_back"]) for row in results["forms"]["forms"].values())


def test_serving_benchmark_writes_its_ratios(tmp_path):
    results = _run("serving", tmp_path)
    assert _positive(results["over_hf_generate"]) and _positive(results["mixed16_over_single"])
    assert "over_vllm" in results  # null without --vllm-python
    assert {(row["kind"], row["adapters"]) for row in results["rows"]} >= {("lora", 16), ("moe-lora", 16)}


@pytest.mark.parametrize("script", ["moe_lora_profile", "serving_profile"])
def test_profilers_run(script, tmp_path):
    results = _run(script, tmp_path)
    assert results["device"] == "cpu"
    if script == "moe_lora_profile":
        assert results["forms"] == {"adapter_first": True, "token_splits": 2}


def test_the_adapter_products_are_timed_after_their_alternatives_are_checked(tmp_path):
    results = _run("adapter_products", tmp_path)  # (the script refuses an alternative unequal to its product)
    plain = {"down_and_router", "up_accumulated", "grad_up", "grad_gated", "grad_x_accumulated", "weight_grad"}
    assert plain <= set(results["products"])
    assert all(_positive(row["us"]) and _positive(row["roofline_fraction"]) for row in results["products"].values())


def test_the_paged_attention_benchmark_times_both_paths_after_checking_them_equal(tmp_path):
    results = _run("paged_attention", tmp_path)  # (the script refuses a kernel unequal to the gathered path)
    assert set(results["rows"]) == {"ours", "gather_sdpa"} and _positive(results["gather_sdpa_over_ours"])
