"""Adapters in the form vLLM serves: PEFT LoRA folders (exported or scale-folded where needed), or
one MoE-LoRA adapter baked into the model for the plugin. Anything vLLM cannot express is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from alphalora.adapters.inject import AdapterError
from alphalora.adapters.io import CONFIG_NAME, read_adapter_config
from alphalora.adapters.peft_export import export_peft
from alphalora.adapters.peft_format import (
    PEFT_CONFIG_NAME,
    PEFT_PREFIX,
    PEFT_WEIGHTS_NAME,
    peft_scaling,
    read_peft_lora_config,
)

from .bake import NATIVE, bake_moe_model

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


@dataclass
class Prepared:
    """What vLLM is given: the model folder and the plain-LoRA adapters as PEFT folders."""

    model: Path
    loras: dict[str, Path]
    max_rank: int  # the largest LoRA rank among the adapters (0 without any)
    moe_adapter: str | None = None  # the MoE-LoRA adapter baked into `model`, if any


def cache_root() -> Path:
    """Where exported and baked folders are kept ($ALPHALORA_CACHE or ~/.cache/alphalora)."""
    return Path(os.environ.get("ALPHALORA_CACHE") or Path.home() / ".cache" / "alphalora") / "vllm"


def _fingerprint(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for item in sorted(Path(folder).resolve().iterdir()):
            stat = item.stat()
            digest.update(f"{item}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def round_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`; AdapterError above vLLM's largest."""
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise AdapterError(f"LoRA rank {rank} is above the largest rank vLLM serves ({VLLM_RANKS[-1]}); {NATIVE}")


def peft_ranks(folder: Path) -> dict[str, int]:
    """Rank of every LoRA module of a PEFT folder, read from the weights' shapes."""
    from safetensors import safe_open

    with safe_open(str(folder / PEFT_WEIGHTS_NAME), "pt") as handle:
        return {key[: -len(".lora_A.weight")]: handle.get_slice(key).get_shape()[0]
                for key in handle.keys() if key.endswith(".lora_A.weight")}


def vllm_rank(folder: Path) -> int:
    """The rank vLLM checks a PEFT folder against --max-lora-rank: the largest of its weights' ranks, its
    config's `r` and its `rank_pattern` values (vLLM reads the config, whatever the weights hold)."""
    config = read_peft_lora_config(folder)
    declared = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    return max([*peft_ranks(folder).values(), *(int(r) for r in declared)], default=1)


def check_peft(folder: Path, name: str) -> dict:
    """The PEFT config of a LoRA folder vLLM can serve; AdapterError naming the native engine otherwise."""
    config = read_peft_lora_config(folder)
    if config.get("modules_to_save"):
        raise AdapterError(f"adapter {name!r} trains {config['modules_to_save']} as well (modules_to_save), which "
                           f"vLLM cannot serve; {NATIVE}")
    return config


def fold_peft_scales(folder: Path, out: Path) -> Path:
    """A copy of a PEFT LoRA folder with each module's scale folded into lora_B and every scale 1,
    for vLLM releases that read only `r` and `lora_alpha` (not rank_pattern/alpha_pattern)."""
    config = read_peft_lora_config(folder)
    tensors = load_file(str(folder / PEFT_WEIGHTS_NAME))
    ranks = peft_ranks(folder)
    for module, rank in ranks.items():
        scale = peft_scaling(config, module.removeprefix(PEFT_PREFIX), rank)
        key = f"{module}.lora_B.weight"
        tensors[key] = (tensors[key].float() * scale).to(tensors[key].dtype).contiguous()
    top = max(ranks.values())
    pattern = {m.removeprefix(PEFT_PREFIX): r for m, r in ranks.items() if r != top}
    config.update(r=top, lora_alpha=top, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _cached(kind: str, sources: list[Path], make) -> Path:
    """make(folder) into the cache, once per version of the source folders; never left half-written."""
    out = cache_root() / f"{kind}-{_fingerprint(*sources)}"
    if not out.exists():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            make(tmp)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def prepare(model_dir: str | Path, adapters: dict[str, str], reads_patterns: bool, plugin: bool) -> Prepared:
    """Turns --adapter NAME=PATH entries into what vLLM can load, refusing what it cannot express.

    `reads_patterns`: the installed vLLM honours PEFT's rank_pattern/alpha_pattern (0.32 does);
    otherwise adapters that use them get their scales folded into lora_B. `plugin`: the
    alphalora vLLM plugin is importable where vLLM runs (needed for MoE-LoRA adapters).
    """
    model = Path(model_dir)
    loras: dict[str, Path] = {}
    moe: list[str] = []
    for name, path in adapters.items():
        folder = Path(path)
        if (folder / CONFIG_NAME).exists():
            plan = read_adapter_config(folder)["plan"]
            if any(n != 1 for n in plan["experts_per_layer"]):
                moe.append(name)
                continue
            if plan.get("modules_to_save"):
                raise AdapterError(f"adapter {name!r} trains {plan['modules_to_save']} as well (modules_to_save), "
                                   f"which vLLM cannot serve; {NATIVE}")
            loras[name] = _cached("peft", [folder], lambda out, f=folder: export_peft(f, out, for_peft=False))
        elif (folder / PEFT_CONFIG_NAME).exists():
            config = check_peft(folder, name)
            patterned = bool(config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora"))
            loras[name] = (folder if reads_patterns or not patterned else
                           _cached("folded", [folder], lambda out, f=folder: fold_peft_scales(f, out)))
        else:
            raise AdapterError(f"adapter {name!r}: {folder} is neither an alphalora nor a PEFT adapter folder")
    if moe:
        if not plugin:
            raise AdapterError(f"mixture-of-LoRA-experts adapter {moe[0]!r}: vLLM serves plain LoRA only, and the "
                               "alphalora vLLM plugin is not installed beside vLLM (`pip install alphalora` in vLLM's "
                               f"environment); or {NATIVE}")
        if len(moe) > 1 or loras:
            raise AdapterError(f"vLLM serves one MoE-LoRA adapter per model, baked in, and no other adapters beside "
                               f"it; got MoE-LoRA {moe} and LoRA {sorted(loras)}. Start one vLLM per MoE-LoRA "
                               f"adapter, or {NATIVE} (it mixes any number in one batch)")
        folder = Path(adapters[moe[0]])
        baked = _cached("baked", [model, folder], lambda out: bake_moe_model(model, folder, out))
        return Prepared(baked, {}, 0, moe[0])
    ranks = [vllm_rank(folder) for folder in loras.values()]
    max_rank = max(ranks, default=0)
    if max_rank:
        round_rank(max_rank)
    return Prepared(model, loras, max_rank)
