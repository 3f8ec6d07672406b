"""The adapter folder: `adapter_model.safetensors` + `alphalora_config.json`, written atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from alphalora._io import atomic_path, check_format_version, file_sha256, read_json, write_text_atomic
from alphalora.allocation.plan import Plan, PlanFormatError
from alphalora.spectral.weights import unwrap_compiled

from .inject import (
    CLASSIFIER_HEADS,
    AdapterError,
    AdapterState,
    adapter_parameters,
    adapter_state,
    inject_adapters,
    unchanged_on_error,
)

FORMAT_VERSION = 1
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "alphalora_config.json"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
# Config fields that do not change what the weights mean (at any depth of the config).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "architectures",
    "_attn_implementation", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "_commit_hash", "gradient_checkpointing",
    "pad_token_id", "bos_token_id", "eos_token_id", "finetuning_task",
    "quantization_config",  # an adapter trained on the full-precision base may run on a quantised one
}


def _architecture_values(values: dict) -> dict[str, Any]:
    """The config values that define what the weights mean: volatile fields and unset (None) values
    dropped; nested dicts (transformers 5's rope_parameters, sub-model configs) kept, filtered alike."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if key in _VOLATILE_CONFIG_KEYS:
            continue
        value = _architecture_value(value)
        if value is not None:
            kept[str(key)] = value
    return kept


def _architecture_value(value: Any) -> Any:
    if isinstance(value, dict):
        return _architecture_values(value) or None
    if isinstance(value, (list, tuple)):
        return [_architecture_value(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) else None


def base_architecture(model: nn.Module) -> dict[str, Any] | None:
    """The base model's architecture-defining config values (None for a model without a config)."""
    config = getattr(model, "config", None)
    return None if config is None else _architecture_values(config.to_dict())


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base model's architecture-defining config values (its parameter shapes without a config)."""
    model = unwrap_compiled(model)
    payload: Any = base_architecture(model)
    if payload is None:
        payload = {n: list(p.shape) for n, p in model.named_parameters() if "lora_" not in n and "router" not in n}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


_MISSING = object()


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def architecture_differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 6) -> list[str]:
    """'key: saved value -> this model's value' for each config key (dotted when nested) that differs."""
    before, after = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(before) | set(after) if before.get(k, _MISSING) != after.get(k, _MISSING))
    lines = [f"{k}: {before.get(k, 'unset')!r} -> {after.get(k, 'unset')!r}" for k in keys[:limit]]
    return lines + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def _base_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or type(model).__name__


def _without_disabled(state: AdapterState, tensors: dict[str, torch.Tensor], model: nn.Module):
    """The plan and tensors of only the switched-on modules: what a finished dynamic HeteroLoRA run keeps."""
    off = set(state.plan.disabled_modules)
    prefixes = tuple(f"{name}." for name in off if name in state.module_names)
    prefixes += tuple(f"{_shortcut_path(model, state, name)}." for name in off if name in state.shortcuts)
    kept = [n for n in state.module_names if n not in off]
    plan = dataclasses.replace(
        state.plan, target_modules=kept, rank_pattern={n: r for n, r in state.plan.rank_pattern.items() if n in kept},
        shortcuts={n: r for n, r in state.plan.shortcuts.items() if n not in off}, disabled_modules=[],
        reallocation=None,
    )
    return plan, kept, {n: t for n, t in tensors.items() if not n.startswith(prefixes)}


def _shortcut_path(model: nn.Module, state: AdapterState, name: str) -> str:
    module = state.shortcuts[name]
    return next(path for path, m in model.named_modules() if m is module)


def save_adapter(model: nn.Module, out_dir: str | Path, drop_disabled: bool = False,
                 label_names: list[str] | None = None) -> Path:
    """Writes the adapter weights and config; the config goes last, so a folder without it is
    never mistaken for a complete adapter. `drop_disabled` leaves out switched-off modules
    (the final adapter of a dynamic HeteroLoRA run); checkpoints keep them. A torch.compile'd model saves the
    adapter of the model it wraps, under that model's names.

    An adapter that saves a classification head records its classes (`num_labels`, `id2label`): the base
    model must be loaded with that many labels to take the head. `label_names` names them by index (the
    training data's class names); without it the model config's id2label does."""
    model = unwrap_compiled(model)
    state = adapter_state(model)
    labels = _recorded_labels(model, state.plan, label_names)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in adapter_parameters(model).items()}
    plan, module_names = state.plan, state.module_names
    if drop_disabled and plan.disabled_modules:
        plan, module_names, tensors = _without_disabled(state, tensors, model)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "alphalora_format_version": str(FORMAT_VERSION)})
        digest = file_sha256(tmp)
    config = {
        "format_version": FORMAT_VERSION,
        "base_model": _base_name(model),
        "base_fingerprint": base_fingerprint(model),
        "plan": plan.to_dict(),
        "module_names": module_names,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "weights_sha256": digest,  # checked at load: a flipped bit in the weights is refused, not served
    }
    config.update(labels)
    can_generate = getattr(model, "can_generate", None)  # transformers' models: a causal LM generates, BERT does not
    if callable(can_generate):
        config["can_generate"] = bool(can_generate())  # the PEFT export's task_type follows it
    architecture = base_architecture(model)
    if architecture is not None:
        config["base_config"] = architecture  # what the fingerprint hashes, so a refusal can name the difference
    write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return folder


def _classifier_heads(plan: Plan) -> list[str]:
    """The sequence-classification heads (BERT's `classifier`, a decoder's `score`) the adapter saves."""
    return [name for name in plan.modules_to_save if name.rpartition(".")[2] in CLASSIFIER_HEADS]


def _recorded_labels(model: nn.Module, plan: Plan, label_names: list[str] | None) -> dict[str, Any]:
    """{"num_labels", "id2label"} of a model whose classification head the adapter saves, else {}."""
    config = getattr(model, "config", None)
    if not _classifier_heads(plan) or getattr(config, "num_labels", None) is None:
        return {}
    num_labels = config.num_labels
    names = list(label_names) if label_names is not None else [
        str(config.id2label.get(index, index)) for index in range(num_labels)]
    if len(names) != num_labels:
        raise AdapterError(f"{len(names)} label names {names[:5]} for a model with {num_labels} labels; pass one "
                           "name per class of the model's head")
    return {"num_labels": num_labels, "id2label": {str(index): str(name) for index, name in enumerate(names)}}


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The validated config of an adapter folder (raises AdapterError naming the problem)."""
    folder = Path(adapter_dir)
    if folder.is_file():
        raise AdapterError(f"{folder} is a file; pass the adapter's folder (the one holding {CONFIG_NAME})")
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        from .peft_format import PEFT_CONFIG_NAME  # (peft_format imports this module)

        if (folder / PEFT_CONFIG_NAME).exists():
            raise AdapterError(f"{folder} is a PEFT adapter ({PEFT_CONFIG_NAME}), not an alphalora one: PEFT "
                               "(PeftModel.from_pretrained), vLLM and `alphalora serve` read it as it is")
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: not an alphalora adapter (or an incomplete save)")
    config = read_json(config_path, "adapter config", "`alphalora train`", AdapterError)
    check_format_version(config, FORMAT_VERSION, f"adapter config {config_path}", "`alphalora train`", AdapterError)
    _check_config_fields(config, config_path)
    try:
        Plan.from_dict(config["plan"])
    except PlanFormatError as error:
        raise AdapterError(f"{config_path}: {error}") from error
    return config


# Required fields of an adapter config and their types; then the optional ones (older configs lack them).
_CONFIG_FIELDS = {"base_model": str, "base_fingerprint": str, "plan": dict, "module_names": list}
_OPTIONAL_CONFIG_FIELDS = {"weights_sha256": str, "base_config": dict, "num_parameters": int, "can_generate": bool,
                           "num_labels": int, "id2label": dict}


def _check_config_fields(config: dict[str, Any], path: Path) -> None:
    missing = [name for name in _CONFIG_FIELDS if name not in config]
    if missing:
        raise AdapterError(f"adapter config {path} lacks {', '.join(missing)}: it was not written by "
                           "`alphalora train` or was edited; re-export or re-train the adapter")
    for name, kind in {**_CONFIG_FIELDS, **_OPTIONAL_CONFIG_FIELDS}.items():
        if name in config and not isinstance(config[name], kind):
            raise AdapterError(f"adapter config {path}: {name} must be a {kind.__name__}, "
                               f"got {type(config[name]).__name__} {config[name]!r:.60}")
    if not all(isinstance(name, str) for name in config["module_names"]):
        raise AdapterError(f"adapter config {path}: module_names must be a list of module names")
    _check_labels(config, path)


def _check_labels(config: dict[str, Any], path: Path) -> None:
    """num_labels (a positive count) and id2label ("0" .. "num_labels - 1" -> class name) agree, where recorded."""
    num_labels, id2label = config.get("num_labels"), config.get("id2label")
    if num_labels is not None and (isinstance(num_labels, bool) or num_labels < 1):
        raise AdapterError(f"adapter config {path}: num_labels must be a positive integer, got {num_labels!r}")
    if id2label is None:
        return
    count = len(id2label) if num_labels is None else num_labels
    if set(id2label) != {str(index) for index in range(count)} or \
            not all(isinstance(name, str) for name in id2label.values()):
        raise AdapterError(f"adapter config {path}: id2label must map each class index \"0\" .. \"{count - 1}\" "
                           f"(num_labels {count}) to its name, got {id2label!r:.80}; re-train or fix the config")


def check_weights_file(folder: Path, config: dict[str, Any]) -> Path:
    """The adapter's safetensors file, refused (AdapterError) if missing, pickled, or not the file its
    config (as `read_adapter_config` returns it) recorded the sha256 of when it was saved (configs from
    before that record have no check)."""
    weights = folder / WEIGHTS_NAME
    if not weights.exists():
        pickled = [name for name in PICKLED_NAMES if (folder / name).exists()]
        if pickled:
            raise AdapterError(f"{folder} holds pickled weights ({pickled[0]}), which are refused because "
                               "loading them can run code; save the adapter as safetensors")
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    expected = config.get("weights_sha256")
    if expected is not None and file_sha256(weights) != expected:
        raise AdapterError(f"{weights} is corrupt or truncated: its sha256 differs from the one {CONFIG_NAME} "
                           "recorded when it was saved; re-export or re-train the adapter (or copy the folder again)")
    return weights


def _load_weights(folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter's tensors, checked against the sha256 its config records (when it records one)."""
    weights = check_weights_file(folder, config)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{weights} is corrupt or truncated ({error}); re-save or re-download it") from error


def _copy_weights(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path, config: dict[str, Any]) -> None:
    params = adapter_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterError(f"{folder / WEIGHTS_NAME} does not match its plan: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    heads = tuple(f"{name}." for name in _classifier_heads(Plan.from_dict(config["plan"])))
    for name, param in params.items():  # every shape before any copy: a refused file changes no weight
        saved = tensors[name]
        if saved.shape != param.shape:
            problem = f"{name}: saved shape {tuple(saved.shape)} != {tuple(param.shape)}"
            if name.startswith(heads) and saved.shape[:1] != param.shape[:1]:  # a head's rows: its classes
                problem += _other_label_count(model, saved, config, folder)
            raise AdapterError(problem)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def _other_label_count(model: nn.Module, saved: torch.Tensor, config: dict[str, Any], folder: Path) -> str:
    """Why a classification head does not fit (the model was loaded with another num_labels), and the fix."""
    trained = config.get("num_labels", saved.shape[0])  # older adapters record no num_labels: the head's rows tell
    has = getattr(getattr(model, "config", None), "num_labels", "another number of")
    return (f": the adapter was trained with {trained} labels and this model has {has}; load the base model with "
            f"AutoModelForSequenceClassification.from_pretrained(base, num_labels={trained}"
            f"{_id2label_argument(config, folder)})")


def _id2label_argument(config: dict[str, Any], folder: Path, shown: int = 12) -> str:
    id2label = config.get("id2label")
    if id2label is None:
        return ""
    if len(id2label) > shown:
        return f", id2label=<the id2label in {folder / CONFIG_NAME}>"
    return f", id2label={dict(sorted((int(index), name) for index, name in id2label.items()))}"


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Loads saved adapter weights into a model that already has the same adapter injected."""
    model = unwrap_compiled(model)
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    saved, state = Plan.from_dict(config["plan"]), adapter_state(model)
    # (which modules are switched off changes as dynamic HeteroLoRA trains; `source` says how a plan was made)
    def shape(plan: Plan) -> Plan:
        return dataclasses.replace(plan, disabled_modules=[], source={})

    if shape(saved) != shape(state.plan):
        raise AdapterError(f"{folder} was saved with a different plan than the model's adapter")
    _copy_weights(model, _load_weights(folder, config), folder, config)
    state.set_disabled(model, saved.disabled_modules)  # a dynamic HeteroLoRA checkpoint's selection


def load_adapter(model: nn.Module, adapter_dir: str | Path, check_base: bool = True) -> AdapterState:
    """Builds the saved plan into `model` (a fresh base model) and loads the adapter weights.

    Refuses a base model whose architecture differs from the one the adapter was trained on,
    a missing or corrupt weights file, pickled weights, and missing or extra tensors, leaving the
    model as it was. A torch.compile'd model gets the adapter in the model it wraps.
    """
    model = unwrap_compiled(model)
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    if check_base and config["base_fingerprint"] != base_fingerprint(model):
        current = base_architecture(model)
        differences = architecture_differences(config["base_config"], current) \
            if "base_config" in config and current is not None else []
        detail = f" (its config -> this model's: {'; '.join(differences)})" if differences else ""
        raise AdapterError(
            f"adapter {folder} was trained on {config['base_model']!r}, whose architecture differs from this "
            f"model ({_base_name(model)!r}){detail}; load it onto the base model it was trained with"
        )
    tensors = _load_weights(folder, config)
    with unchanged_on_error(model):
        state = inject_adapters(model, Plan.from_dict(config["plan"]))
        _copy_weights(model, tensors, folder, config)
    return state
