"""PEFT's LoRA folder format as users already have it: file names, the config check, module scales."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from alphalora._io import read_json
from alphalora._numbers import is_positive_number

from .inject import AdapterError
from .io import PICKLED_NAMES

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's prefix on every saved tensor name


def read_peft_lora_config(folder: str | Path) -> dict[str, Any]:
    """The config of a PEFT LoRA folder with safetensors weights; AdapterError naming the problem
    for another PEFT method, DoRA, trained biases, a malformed config, or missing or pickled weights.

    modules_to_save is left to the caller: what it can apply differs between servers.
    """
    folder = Path(folder)
    config = read_json(folder / PEFT_CONFIG_NAME, "PEFT adapter config", "PEFT's `save_pretrained`", AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{folder / PEFT_CONFIG_NAME} is not a PEFT adapter config (a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder} is a PEFT {config.get('peft_type')} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(f"{folder} is a DoRA adapter, which is not served; train a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{folder} trains the base model's biases as well (bias={config['bias']!r}), which LoRA "
                           "servers do not apply; train with bias='none'")
    where = folder / PEFT_CONFIG_NAME
    for key in ("r", "lora_alpha"):
        if not is_positive_number(config.get(key)):
            raise AdapterError(f"{where}: {key!r} must be a positive, finite number, got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        _check_pattern(config.get(key), key, where)
    if not (folder / PEFT_WEIGHTS_NAME).exists():
        pickled = [name for name in PICKLED_NAMES if (folder / name).exists()]
        reason = (f"holds pickled weights ({pickled[0]}), which are refused because loading them can run code; "
                  "re-save with safe_serialization=True" if pickled else f"has no {PEFT_WEIGHTS_NAME}")
        raise AdapterError(f"{folder} {reason}")
    return config


def _check_pattern(pattern: Any, key: str, where: Path) -> None:
    """AdapterError unless a rank_pattern/alpha_pattern is absent or maps regular expressions to positive numbers."""
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise AdapterError(f"{where}: {key!r} must map module names to numbers, got {pattern!r}")
    for name, value in pattern.items():
        try:
            re.compile(name)
        except re.error as error:
            raise AdapterError(f"{where}: {key!r} key {name!r} is not a regular expression ({error})") from error
        if not is_positive_number(value):
            raise AdapterError(f"{where}: {key!r} gives {name!r} the value {value!r}; it must be a positive, finite "
                               "number")


def _match_pattern(pattern: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (its get_pattern_key): the first key that is the
    module name or a dotted suffix of it, keys read as regular expressions."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def peft_scaling(config: dict, name: str, rank: int) -> float:
    """The scale PEFT gives module `name` of rank `rank`: its alpha (alpha_pattern first) over r,
    or over sqrt(r) for rsLoRA."""
    alpha = _match_pattern(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
