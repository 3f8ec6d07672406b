"""`alphalora serve --engine vllm` without vLLM: the command line it builds, and what it refuses before vLLM starts.

A stand-in "vLLM python" (a shell script) answers the install probe and records the command it is
exec'd with, so the whole CLI path runs here; the real server is exercised in test_vllm_backend.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from alphalora.adapters import AdapterError
from alphalora.adapters.peft_export import export_peft
from alphalora.serving.vllm.adapters import fold_peft_scales, round_rank
from alphalora.serving.vllm.bake import ADAPTER_SUBDIR, PLUGIN_ARCHITECTURES, bake_moe_model
from alphalora.serving.vllm.launch import ServeOptions, VLLMInstall, build_launch
from tests.serving.vllm_helpers import VLLM_TINY, own_adapter, tiny_model
from tests.tiny_models import build

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    return {
        "root": root,
        "model": tiny_model(root / "tiny-llama"),
        "hetero": own_adapter(root / "hetero", "llama", (1, 1), rank_pattern={"q": 2, "down": 24}, seed=3),
        "moe": own_adapter(root / "moe", "llama", (3, 2), seed=4),
        "moe2": own_adapter(root / "moe2", "llama", (2, 2), seed=5),
        "shared_router": own_adapter(root / "shared", "llama", (2, 2), seed=6, router={"type": "shared"}),
        "heads": own_adapter(root / "heads", "llama", (1, 1), seed=7, modules_to_save=["lm_head"]),
    }


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHALORA_CACHE", str(tmp_path / "cache"))


def _peft_folder(folder: Path, ranks: dict[str, int], **config) -> Path:
    """A hand-written PEFT LoRA folder (q_proj/v_proj of block 0) with the given ranks."""
    folder.mkdir(parents=True)
    tensors = {}
    for module, rank in ranks.items():
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 128)
        tensors[f"{key}.lora_B.weight"] = torch.randn(128 if module == "q_proj" else 64, rank)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    top = max(ranks.values())
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": top, "lora_alpha": 2 * top, "target_modules": list(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != top}, **config}))
    return folder


def _launch(folders, adapters: dict[str, Path], version: str = "0.32.0", plugin: bool = False, **options):
    install = VLLMInstall("/opt/vllm/bin/python", version, plugin)
    return build_launch(ServeOptions(str(folders["model"]), {k: str(v) for k, v in adapters.items()}, **options),
                        install)


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_serve_flags_map_to_vllm_and_max_lora_rank_is_the_largest_rank_rounded_up(folders):
    launch = _launch(folders, {"hetero": folders["hetero"]}, host="0.0.0.0", port=9001, api_key="k", max_loras=3,
                     max_num_seqs=7, max_num_batched_tokens=99, max_model_len=128, dtype="float32")
    argv = launch.argv
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.launchers.api_server.entry"]
    expected = {"--model": str(folders["model"]), "--served-model-name": "tiny-llama", "--host": "0.0.0.0",
                "--port": "9001", "--api-key": "k", "--max-loras": "3", "--max-num-seqs": "7",
                "--max-num-batched-tokens": "99", "--max-model-len": "128", "--dtype": "float32",
                "--max-lora-rank": "32"}  # ranks 2, 4 and 24: vLLM accepts 1, 8, 16, 32, ...
    assert {flag: _value(argv, flag) for flag in expected} == expected
    assert "--enable-lora" in argv
    module = json.loads(_value(argv, "--lora-modules"))  # vLLM's JSON form, safe for any path
    name, path = module["name"], module["path"]
    assert name == "hetero" and module["base_model_name"] == "tiny-llama"
    exported = json.loads((Path(path) / "adapter_config.json").read_text())
    reference = export_peft(folders["hetero"], folders["root"] / "ref") / "adapter_config.json"
    reference = json.loads(reference.read_text())
    assert exported == reference
    assert launch.model_names == ["tiny-llama", "hetero"]


def test_releases_before_the_launchers_module_get_their_own_server_module(folders):
    old = build_launch(ServeOptions(str(folders["model"])), VLLMInstall("/opt/vllm/bin/python", "0.11.0", False, False))
    assert old.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_base_model_alone_starts_vllm_without_lora(folders):
    argv = _launch(folders, {}).argv
    assert "--enable-lora" not in argv and "--lora-modules" not in argv
    assert "--no-enable-prefix-caching" not in argv  # vLLM's default: on, as ours
    assert "--no-enable-prefix-caching" in _launch(folders, {}, enable_prefix_caching=False).argv
    assert _value(_launch(folders, {}, chat_template="t.jinja").argv, "--chat-template") == "t.jinja"


def test_adapter_dir_turns_on_runtime_lora_loading(folders, tmp_path):
    _peft_folder(tmp_path / "dir" / "a", {"q_proj": 64})
    launch = _launch(folders, {}, adapter_dir=str(tmp_path / "dir"))
    assert launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert _value(launch.argv, "--max-lora-rank") == "64"


def test_max_lora_rank_covers_the_rank_a_peft_config_declares(folders, tmp_path):
    """vLLM checks max(r, *rank_pattern) against --max-lora-rank, whatever ranks the weights hold."""
    folder = _peft_folder(tmp_path / "dir" / "declared", {"q_proj": 8})
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 64, "rank_pattern": {"q_proj": 8}}))
    assert _value(_launch(folders, {"declared": folder}).argv, "--max-lora-rank") == "64"
    assert _value(_launch(folders, {}, adapter_dir=str(tmp_path / "dir")).argv, "--max-lora-rank") == "64"


def test_a_path_with_a_comma_reaches_vllm_whole(folders, tmp_path):
    """vLLM reads NAME=PATH only without a comma, else as JSON: the JSON form always parses."""
    folder = _peft_folder(tmp_path / "a,b", {"q_proj": 8})
    module = json.loads(_value(_launch(folders, {"p": folder}).argv, "--lora-modules"))
    assert module["path"] == str(folder)


def test_peft_patterns_are_kept_for_vllm_032_and_folded_into_lora_b_for_older_releases(folders, tmp_path):
    peft_dir = _peft_folder(tmp_path / "p", {"q_proj": 8, "v_proj": 4}, alpha_pattern={"v_proj": 3})
    assert _launch(folders, {"p": peft_dir}).prepared.loras["p"] == peft_dir
    folded = _launch(folders, {"p": peft_dir}, version="0.10.1").prepared.loras["p"]
    assert folded != peft_dir and (folded / "adapter_config.json").exists()


def test_folded_peft_adapter_gives_peft_the_same_logits_with_every_scale_one(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 40}, use_rslora=True)
    model = peft.get_peft_model(build("llama", 0, **VLLM_TINY), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "orig")
    folded = fold_peft_scales(tmp_path / "orig", tmp_path / "folded")
    saved = json.loads((folded / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == saved["r"] and saved["alpha_pattern"] == saved["rank_pattern"]
    assert not saved["use_rslora"]  # so a reader of only r and lora_alpha scales every module by 1
    ids = torch.tensor([[5, 9, 17, 33, 8, 40]])
    logits = [peft.PeftModel.from_pretrained(build("llama", 0, **VLLM_TINY), d).eval()(ids).logits
              for d in (tmp_path / "orig", folded)]
    assert not torch.allclose(logits[0], build("llama", 0, **VLLM_TINY)(ids).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank,allowed", [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (512, 512)])
def test_ranks_round_up_to_what_vllm_accepts(rank, allowed):
    assert round_rank(rank) == allowed


def test_moe_adapter_is_baked_into_a_plugin_model_and_served_under_its_name(folders):
    launch = _launch(folders, {"moe": folders["moe"]}, plugin=True)
    baked = Path(_value(launch.argv, "--model"))
    assert json.loads((baked / "config.json").read_text())["architectures"] == [PLUGIN_ARCHITECTURES["llama"]]
    assert (baked / ADAPTER_SUBDIR / "alphalora_config.json").exists()
    assert (baked / "model.safetensors").resolve() == (folders["model"] / "model.safetensors").resolve()
    assert _value(launch.argv, "--served-model-name") == "moe" and "--enable-lora" not in launch.argv


@pytest.mark.parametrize("case,needle", [
    ("moe_without_plugin", "plugin is not installed"),
    ("two_moe", "one MoE-LoRA adapter per model"),
    ("moe_and_lora", "one MoE-LoRA adapter per model"),
    ("shared_router", "shared (per-layer) router"),
    ("own_modules_to_save", "modules_to_save"),
    ("peft_modules_to_save", "modules_to_save"),
    ("rank_above_512", "above the largest rank vLLM serves"),
])
def test_what_vllm_cannot_express_is_refused_naming_the_native_engine(folders, tmp_path, case, needle):
    cases = {
        "moe_without_plugin": lambda: ({"moe": folders["moe"]}, False),
        "two_moe": lambda: ({"a": folders["moe"], "b": folders["moe2"]}, True),
        "moe_and_lora": lambda: ({"a": folders["moe"], "b": folders["hetero"]}, True),
        "shared_router": lambda: ({"a": folders["shared_router"]}, True),
        "own_modules_to_save": lambda: ({"a": folders["heads"]}, True),
        "peft_modules_to_save": lambda: ({"a": _peft_folder(tmp_path / "p", {"q_proj": 8},
                                                            modules_to_save=["lm_head"])}, True),
        "rank_above_512": lambda: ({"a": _peft_folder(tmp_path / "p", {"q_proj": 600})}, True),
    }
    adapters, plugin = cases[case]()
    with pytest.raises(AdapterError, match=re.escape(needle)) as error:
        _launch(folders, adapters, plugin=plugin)
    assert "--engine native" in str(error.value)


def test_baking_refuses_a_base_model_the_adapter_was_not_trained_on(folders, tmp_path):
    other = tiny_model(tmp_path / "other", "llama")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(AdapterError, match="differs"):
        bake_moe_model(other, folders["moe"], tmp_path / "baked")


def _fake_vllm_python(folder: Path, plugin: bool) -> Path:
    """A stand-in for vLLM's python: answers the install probe and records how it was exec'd."""
    script = folder / "python"
    script.write_text("#!/bin/sh\n"
                      f"if [ \"$1\" = -c ]; then echo '{{\"vllm\": true, \"version\": \"0.32.0\", \"launcher\": true, "
                      f"\"plugin\": {str(plugin).lower()}}}'; exit 0; fi\n"
                      f"printf '%s\\n' \"$@\" > {folder}/argv\n")
    script.chmod(0o755)
    return script


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphalora.cli", "serve", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_execs_vllm_server_with_the_built_command(folders, tmp_path):
    fake = _fake_vllm_python(tmp_path, plugin=False)
    result = _cli(str(folders["model"]), "--engine", "vllm", "--adapter", f"hetero={folders['hetero']}",
                  "--port", "8123", env={"ALPHALORA_VLLM_PYTHON": str(fake), "ALPHALORA_CACHE": str(tmp_path / "c")})
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[:2] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    assert _value(argv, "--port") == "8123" and json.loads(_value(argv, "--lora-modules"))["name"] == "hetero"


def test_cli_refuses_an_moe_adapter_without_the_plugin_before_vllm_starts(folders, tmp_path):
    fake = _fake_vllm_python(tmp_path, plugin=False)
    result = _cli(str(folders["model"]), "--engine", "vllm", "--vllm-python", str(fake),
                  "--adapter", f"moe={folders['moe']}", env={"ALPHALORA_CACHE": str(tmp_path / "c")})
    assert result.returncode == 2
    assert "--engine native" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "argv").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_cli_without_vllm_prints_the_install_command_not_a_traceback(folders):
    env = {k: v for k, v in os.environ.items() if k != "ALPHALORA_VLLM_PYTHON"}
    result = subprocess.run([sys.executable, "-m", "alphalora.cli", "serve", str(folders["model"]), "--engine", "vllm"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2
    assert 'pip install "alphalora[vllm]"' in result.stderr
    assert "pip uninstall -y torchvision torchaudio torchcodec" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("damage, needle", [("renormalize", "un-renormalised router gates"),
                                            ("weights", "sha256 differs")])
def test_baking_refuses_gates_no_engine_computes_and_damaged_weights(folders, tmp_path, damage, needle):
    """The plugin reads the weights file itself, so the recorded checksum is checked at baking."""
    import shutil

    if damage == "renormalize":
        adapter = own_adapter(tmp_path / "plain_gates", "llama", (2, 2), seed=8, router={"renormalize": False})
    else:
        adapter = Path(shutil.copytree(folders["moe"], tmp_path / "damaged"))
        data = bytearray((adapter / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 1  # a flipped bit in the last tensor's data: the file still parses
        (adapter / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=needle):
        bake_moe_model(folders["model"], adapter, tmp_path / "baked")


def test_every_baked_architecture_is_one_the_plugin_registers():
    """The families are listed twice (bake: model type -> architecture; plugin: architecture -> class, kept
    free of the package's imports): a family added to one list only would bake a model vLLM cannot load."""
    from alphalora.serving.vllm.plugin import ARCHITECTURES

    assert set(PLUGIN_ARCHITECTURES.values()) == set(ARCHITECTURES)
    assert all(cls.startswith("MoELoRA") and arch == f"AlphaLoRAMoE{cls.removeprefix('MoELoRA')}"
               for arch, cls in ARCHITECTURES.items())
