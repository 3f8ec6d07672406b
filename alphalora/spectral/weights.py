"""The 2-D weight matrices of a model, from a live `nn.Module` or tensor by tensor from disk.

A mixture of experts' fused 3-D expert parameters and tensors are found here and read, expert by expert, by
`experts`; `WeightEntry` and `WeightSourceError` live in `entries` (imported here, where callers find them)."""

from __future__ import annotations

import functools
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from alphalora._io import first_line

from .entries import WeightEntry, WeightSourceError, named_entry
from .experts import (
    checkpoint_expert_entries,
    fused_expert_params,
    is_fused_expert_tensor,
    live_expert_entries,
    with_routers,
)
from .roles import CONV1D_LEAVES, is_embedding_name, is_router, moe_blocks

REDOWNLOAD = "the checkpoint is damaged or incomplete: download or save it again"


def _detached(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.detach().t() if transposed else weight.detach()


ADAPTER_ONLY_MODULES = {"alphalora_router", "alphalora_shortcuts"}  # a block's shared router, its shortcuts


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The model itself under torch.compile's wrapper (an OptimizedModule, whose parameter and module names all
    start with `_orig_mod.`): weights are read, and adapters built, saved and loaded, under the model's own names."""
    while "_orig_mod" in getattr(model, "_modules", {}) and type(model).__name__ == "OptimizedModule":
        model = model._modules["_orig_mod"]
    return model


def _without_wrappers(model: nn.Module) -> nn.Module:
    """The transformers model under torch.compile's wrapper and a PEFT model's (PeftModel -> its tuner -> the
    model), whose module names add prefixes (`_orig_mod.`, `base_model.model.`) to the model's own."""
    while True:
        model = unwrap_compiled(model)
        if not (type(model).__name__.startswith("PeftModel") and isinstance(
                getattr(getattr(model, "base_model", None), "model", None), nn.Module)):
            return model
        model = model.base_model.model


def _wrapped_base(module: nn.Module) -> nn.Module | None:
    """The frozen base module inside an adapter wrapper: this project's MoE-LoRA layer (`base`), a PEFT tuner
    layer (`base_layer`) or PEFT's modules_to_save wrapper (`original_module`); None for other modules."""
    if hasattr(module, "lora_A") and isinstance(getattr(module, "base", None), nn.Module):
        return module.base
    if isinstance(getattr(module, "base_layer", None), nn.Module):
        return module.base_layer
    if hasattr(module, "modules_to_save") and isinstance(getattr(module, "original_module", None), nn.Module):
        return module.original_module
    return None


def _base_modules(model: nn.Module):
    """(name, module) over the model's modules as the base model has them: an adapter wrapper's base module under
    the wrapper's name (the name it had before the adapter), and nothing else from inside a wrapper (the adapter's
    own matrices, routers, a modules_to_save copy), nor a shared router's or shortcut connections' modules."""
    wrapper: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if wrapper is not None and name.startswith(f"{wrapper[0]}."):
            if module is wrapper[1]:
                yield wrapper[0], module
            continue
        base = _wrapped_base(module)
        if base is not None:
            wrapper = (name, base)
        elif not ADAPTER_ONLY_MODULES.intersection(name.split(".")):
            yield name, module


def module_weights(model: nn.Module, include_embeddings: bool = False) -> list[WeightEntry]:
    """Linear, Conv1D (GPT-2) and, if asked, embedding weights of a live model, in module order.

    A mixture of experts' fused 3-D expert parameters give one entry per expert and matrix (`experts`),
    and its router (a `gate` or `router` beside the experts, an nn.Linear or transformers' TopKRouter holding a
    2-D weight) has role "router".

    A model with adapters (this project's, or PEFT's) is read as its base model: the frozen base weights under
    their own names, without the adapter's matrices. To analyse fine-tuned weights, merge the adapter first
    (PEFT's `merge_and_unload()`)."""
    model = _without_wrappers(model)
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_embeddings is not None:  # (an adapted LM head: its base)
        output_embeddings = _wrapped_base(output_embeddings) or output_embeddings
    modules = list(_base_modules(model))
    expert_blocks = moe_blocks(name for name, _ in modules)
    entries: list[WeightEntry] = []
    seen: set[int] = set()
    for name, module in modules:
        fused = fused_expert_params(module)
        if fused:
            if not any(id(p) in seen for p in fused.values()):
                seen.update(id(p) for p in fused.values())
                entries.extend(live_expert_entries(name, module, fused))
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or id(weight) in seen:
            continue
        type_name = type(module).__name__.lower()
        router = is_router(name, expert_blocks)
        if isinstance(module, nn.Embedding) or module is output_embeddings:
            if not include_embeddings:
                continue
            kind = "embedding"
        elif isinstance(module, nn.Linear) or router:  # a TopKRouter applies F.linear(x, weight)
            kind = "linear"
        elif type_name == "conv1d":  # transformers' GPT-2 Conv1D: weight is (in, out)
            kind = "conv1d"
        else:
            continue
        seen.add(id(weight))
        transposed = kind == "conv1d"
        shape = (weight.shape[1], weight.shape[0]) if transposed else (weight.shape[0], weight.shape[1])
        entries.append(
            named_entry(name, shape, kind, functools.partial(_detached, weight, transposed),
                        weight.is_floating_point(), role="router" if router else None)
        )
    return entries


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _unreadable(file: Path, reason: str, fix: str = REDOWNLOAD) -> WeightSourceError:
    return WeightSourceError(f"cannot read {file}: {reason}; {fix}")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _unreadable(file, first_line(error)) from error
    if not isinstance(data, dict):
        raise _unreadable(file, f"expected a JSON object, found {type(data).__name__}")
    return data


# transformers' families whose projections are Conv1D, weight (in, out): GPT-2 and the models built on it
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
ADAPTER_FILE_PREFIXES = ("adapter_model",)  # PEFT's and this project's adapter weights, often saved beside a base


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files transformers loads from a model folder, in its order of preference: model.safetensors, the
    shards model.safetensors.index.json names, pytorch_model.bin, the shards of its index (so a stale index left
    beside a re-saved single file is passed over, as transformers passes it over); else the folder's *.safetensors
    or pytorch_model*.bin files bar an adapter's. WeightSourceError naming the file where a shard is missing."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            return _shards(path, name) if name.endswith(".index.json") else [path / name]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        # No standard name: every weight file but an adapter's (PEFT's or this project's, beside its base)
        files = sorted(f for f in path.glob(pattern) if not f.name.startswith(ADAPTER_FILE_PREFIXES))
        if files:
            return files
    return []


def _shards(path: Path, index_name: str) -> list[Path]:
    """The shard files an index names, each checked to exist."""
    index = path / index_name
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise _unreadable(index, "no `weight_map` object of tensor name -> shard file")
    files = [path / f for f in dict.fromkeys(weight_map.values())]
    for file in files:
        if not file.is_file():
            raise _unreadable(file, f"the shard named in {index_name} is missing")
    return files


def _tensor_readers(file: Path):
    """(key, shape, is floating point, load) for every tensor of a checkpoint file, without loading the tensors;
    `load(index)` reads only `tensor[index]` (one expert of a fused 3-D tensor), `load()` the whole tensor."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
                dtypes = {k: handle.get_slice(k).get_dtype() for k in keys}
        except (SafetensorError, OSError) as error:
            raise _unreadable(file, first_line(error)) from error

        def load(key: str, index: tuple | None = None) -> torch.Tensor:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
            except (SafetensorError, OSError) as error:
                raise _unreadable(file, f"tensor {key}: {first_line(error)}") from error

        # safetensors dtype codes: F16, BF16, F32, F8_E4M3, ... are floating point; I8, U8, I32, BOOL, ... are not.
        return [
            (k, shapes[k], dtypes[k].startswith(("F", "BF")), (lambda index=None, k=k: load(k, index))) for k in keys
        ]
    # pytorch_model.bin: memory-mapped, weights only (no code runs on load).
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise _unreadable(
            file, f"it holds Python objects besides tensors{what}, which weights-only loading refuses",
            "if you trust the file, load the model with transformers and save it as safetensors "
            "(`model.save_pretrained(folder)`)",
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise _unreadable(file, first_line(error)) from error
    if not isinstance(state, dict):
        raise _unreadable(file, f"expected a state dict, found {type(state).__name__}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return [
        (k, tuple(v.shape), v.is_floating_point(), (lambda index=None, v=v: v if index is None else v[index]))
        for k, v in tensors.items()
    ]


def checkpoint_weights(path: str | Path, include_embeddings: bool = False) -> list[WeightEntry]:
    """The 2-D `.weight` tensors of a Hugging Face model folder, read lazily shard by shard.

    A mixture of experts' fused 3-D expert tensors are read as one entry per expert and matrix, each expert
    alone from the file (`checkpoint_expert_entries`); its router (`mlp.gate`, `block_sparse_moe.gate`,
    `mlp.router`) has role "router"."""
    folder = Path(path)
    if not folder.exists():
        raise WeightSourceError(f"model path {folder} does not exist; pass a Hugging Face model folder")
    if not folder.is_dir():
        raise WeightSourceError(f"model path {folder} is not a folder; pass the folder that holds config.json")
    files = checkpoint_files(folder)
    if not files:
        raise WeightSourceError(
            f"no weights in {folder}: expected *.safetensors (or pytorch_model*.bin) files, "
            "as written by `model.save_pretrained(folder)`"
        )
    config_file = folder / "config.json"
    config = _read_json(config_file) if config_file.exists() else {}
    model_type = config.get("model_type", "")
    entries: list[WeightEntry] = []
    fused: list[tuple[str, tuple[int, ...], bool, Callable]] = []
    for file in files:
        for key, shape, floating, load in _tensor_readers(file):
            if is_fused_expert_tensor(key, shape):
                fused.append((key, shape, floating, load))
                continue
            if not key.endswith(".weight") or len(shape) != 2:
                continue
            name = key[: -len(".weight")]
            leaf = name.rsplit(".", 1)[-1]
            if is_embedding_name(name):
                if not include_embeddings:
                    continue
                kind = "embedding"
            elif leaf in CONV1D_LEAVES and (model_type in CONV1D_MODEL_TYPES or not model_type):
                kind = "conv1d"  # (without a config.json, GPT-2's names: Qwen-1's Linear c_attn ships one)
            else:
                kind = "linear"
            if kind == "conv1d":
                entries.append(named_entry(name, (shape[1], shape[0]), kind, (lambda f=load: f().t()), floating))
            else:
                entries.append(named_entry(name, (shape[0], shape[1]), kind, load, floating))
    entries.extend(checkpoint_expert_entries(folder, fused, config))
    entries = with_routers(entries, {key for key, *_ in fused})
    # Shards list keys alphabetically; order them as a person reads a model: block 2 before 10.
    return sorted(entries, key=lambda e: _natural_key(e.name))


