"""64 concurrent streaming clients over mixed adapters: every stream must finish, nothing lost.

    python benchmarks/load_test.py --url http://127.0.0.1:8000 --models base,moe,lora --clients 64
(or `--model-dir DIR --adapter NAME=PATH ...` to start a server on a free local port first)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class ClientResult:
    model: str
    ok: bool = False
    done_marker: bool = False
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    seconds: float = 0.0
    chunks: list[str] = field(default_factory=list)


def stream_one(url: str, model: str, prompt: str, max_tokens: int, api_key: str | None) -> ClientResult:
    result = ClientResult(model)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
               "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, headers=headers, timeout=600) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
                return result
            for line in response.iter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    result.done_marker = True
                    continue
                chunk = json.loads(line[len("data: "):])
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    result.chunks.append(choice["text"])
                    result.finish_reason = choice["finish_reason"] or result.finish_reason
        result.ok = result.done_marker and result.tokens == max_tokens and result.finish_reason == "length"
    except httpx.HTTPError as error:
        result.error = repr(error)
    result.seconds = time.perf_counter() - start
    return result


def run_load(url: str, models: list[str], clients: int, max_tokens: int,
             api_key: str | None = None) -> list[ClientResult]:
    results: list[ClientResult | None] = [None] * clients
    # One shared preamble, as a system prompt: the clients' requests share its KV blocks (prefix caching)
    # while they run, are cancelled and finish.
    preamble = "answer in a few words. " * 8
    prompts = [preamble + p for p in ("the cat sat on the mat", "one two three", "red green blue yellow",
                                      "a bird sang in the tree")]

    def worker(i: int) -> None:
        results[i] = stream_one(url, models[i % len(models)], prompts[i % len(prompts)], max_tokens, api_key)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server command in a subprocess (its output in `log`), returned once its /health answers;
    stop() ends it."""

    def __init__(self, argv: list[str], log: Path, port: int, env: dict[str, str] | None = None,
                 cwd: Path | None = None, timeout: float = 600, name: str = "server"):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the {name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the {name} did not start in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_local_server(model_dir: str, adapters: dict[str, str], **options):
    """Starts `alphalora serve` in this process on a free port; returns (url, server, state)."""
    import uvicorn

    from alphalora.serving.openai import build_app
    from alphalora.serving.openai.server import make_state

    state = make_state(model_dir, adapters, **options)
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--models", default=None, help="comma-separated model names to spread clients over")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    server = None
    url = args.url
    if url is None:
        if args.model_dir is None:
            parser.error("give --url of a running server or --model-dir to start one")
        adapters = dict(a.split("=", 1) for a in args.adapter)
        url, server, state = start_local_server(args.model_dir, adapters, max_num_seqs=64)
        models = [state.base_name, *adapters]
    else:
        models = args.models.split(",") if args.models else []
    start = time.perf_counter()
    results = run_load(url, models, args.clients, args.max_tokens, args.api_key)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    print(f"{args.clients} streaming clients over {models}: {len(results) - len(failed)} complete, {len(failed)} "
          f"failed, {sum(r.tokens for r in results) / elapsed:.1f} output tok/s, median stream "
          f"{statistics.median(r.seconds for r in results):.2f} s")
    for r in failed[:5]:
        print(f"  failed: {r.model}: {r.error or (r.done_marker, r.tokens, r.finish_reason)}", file=sys.stderr)
    if server is not None:
        server.should_exit = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
