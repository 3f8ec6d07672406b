"""Base models named by Hugging Face Hub id: resolved through the Hub's cache, as transformers resolves them.

No hub is reachable from the tests: a Hub cache is laid out as `huggingface_hub` writes it (refs/main naming a
snapshot folder) and the Hub is switched off (HF_HUB_OFFLINE), so an id resolves from the cache or not at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from safetensors.torch import load_file

import alphalora
from alphalora.model_source import default_served_name, is_hub_id, model_folder
from alphalora.spectral import AnalysisError
from tests.tiny_models import save_tiny

REPO_ID = "alphalora-tests/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """(cache folder, the snapshot's folder) with a tiny Llama cached under REPO_ID."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = save_tiny("llama", repo / "snapshots" / COMMIT, initializer_range=0.5)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, snapshot


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def _offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("gpt2")
    assert not is_hub_id("org/local")  # a folder here wins, as in transformers
    assert not any(is_hub_id(p) for p in ("./model", "/models/llama", "~/llama", "a/b/c", Path("gpt2")))
    assert default_served_name("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert default_served_name("/models/llama-7b") == "llama-7b"


def test_analyze_reads_a_hub_id_from_the_cache_as_it_reads_the_folder(offline_hub):
    _, snapshot = offline_hub
    by_id = alphalora.analyze(REPO_ID, progress=False)
    by_folder = alphalora.analyze(snapshot, progress=False)
    assert by_id.model == REPO_ID
    assert [(m.name, m.alpha) for m in by_id.matrices] == [(m.name, m.alpha) for m in by_folder.matrices]
    assert len(by_id.matrices) > 0


def test_an_id_neither_cached_nor_reachable_is_a_clear_error(offline_hub):
    with pytest.raises(AnalysisError, match=r"nobody/nothing is not a local folder and the Hugging Face Hub could "
                                            r"not provide it .*unset HF_HUB_OFFLINE, or pass a local model folder"):
        alphalora.analyze("nobody/nothing", progress=False)
    assert model_folder(REPO_ID) == offline_hub[1]


def test_serving_and_training_take_a_hub_id(hub_cache, tmp_path):
    """`alphalora serve` names the base model by its id, as vLLM does; `alphalora train` records the id as the
    adapter's base model (PEFT's base_model_name_or_path on export), so the adapter names what it was trained on."""
    cache, _ = hub_cache
    env = _offline_env(cache)
    script = (f"from alphalora.serving.openai.server import make_state\n"
              f"state = make_state({REPO_ID!r}, {{}}, engine_thread=False)\n"
              "print(state.base_name)\nstate.engine.close()\n")
    served = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert served.returncode == 0, served.stderr
    assert served.stdout.strip().splitlines()[-1] == REPO_ID

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "the cat sat on", "completion": "the mat"}) for _ in range(8)))
    plan, out = tmp_path / "plan.json", tmp_path / "adapter"
    cli = [sys.executable, "-m", "alphalora.cli"]
    steps = [["allocate", "--method", "uniform", "--num-layers", "2", "--budget", "4", "--out", str(plan)],
             ["train", "--model", REPO_ID, "--plan", str(plan), "--data", str(data), "--out", str(out),
              "--max-steps", "2", "--no-progress"]]
    for step in steps:
        result = subprocess.run(cli + step, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
    assert json.loads((out / "alphalora_config.json").read_text())["base_model"] == REPO_ID
    assert load_file(str(out / "adapter_model.safetensors"))
