"""Export of single-expert (plain, heterogeneous-rank) adapters to PEFT's LoRA format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from alphalora._io import atomic_path, write_text_atomic

from .inject import CLASSIFIER_HEADS, AdapterError
from .io import CONFIG_NAME, _load_weights, read_adapter_config
from .peft_format import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME


def export_peft(adapter_dir: str | Path, out_dir: str | Path, for_peft: bool = True) -> Path:
    """Writes a PEFT LoRA folder computing exactly what the adapter computes.

    Each module's scale (lora_alpha / its rank) is folded into lora_B and the exported
    lora_alpha equals r for every module (alpha_pattern = rank_pattern), so the scaling is 1
    whether a reader honours rank_pattern/alpha_pattern (PEFT, vLLM 0.32) or only r and
    lora_alpha (older vLLM releases). Mixture-of-experts adapters cannot be expressed and
    are refused.
    """
    folder, out = Path(adapter_dir), Path(out_dir)
    config = read_adapter_config(folder)
    _refuse_overwriting_an_adapter(folder, out)
    plan = config["plan"]
    if any(n != 1 for n in plan["experts_per_layer"]):
        raise AdapterError(
            f"{folder} is a mixture-of-LoRA-experts adapter (experts per layer {plan['experts_per_layer']}); "
            "PEFT LoRA has one expert per module. Serve it with the native engine (`alphalora serve`)"
        )
    switched_off = set(plan.get("disabled_modules", []))  # a dynamic HeteroLoRA checkpoint: export what is on
    shortcuts = [name for name in plan.get("shortcuts", {}) if name not in switched_off]
    if shortcuts:
        raise AdapterError(
            f"{folder} has LoRA shortcut connections ({len(shortcuts)} switched on), which PEFT LoRA cannot express; "
            "serve it with the native engine (`alphalora serve`), use it from Python "
            "(`alphalora.adapters.load_adapter`), or allocate without --shortcuts"
        )
    tensors = _load_weights(folder, config)
    names = [name for name in config["module_names"] if name not in switched_off]
    if not names:
        raise AdapterError(f"{folder}: every adapted module is switched off (disabled_modules); nothing to export")
    if for_peft:  # vLLM (`serve --engine vllm`) reads the folder with its own loader, not PEFT's
        _refuse_peft_moe_retargeting(folder, config, names)
    weights: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in names:
        a, b = tensors[f"{name}.lora_A"][0], tensors[f"{name}.lora_B"][0]  # (r, in), (out, r)
        rank = a.shape[0]
        ranks[name] = rank
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (b * (plan["lora_alpha"] / rank)).contiguous()
    heads = plan.get("modules_to_save", [])
    for key, value in tensors.items():
        if any(key.startswith(f"{head}.") for head in heads):
            weights[f"{PEFT_PREFIX}{key}"] = value
    base_rank = max(ranks.values())
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(config, heads),
        "base_model_name_or_path": config["base_model"],
        "r": base_rank,
        "lora_alpha": base_rank,
        "rank_pattern": {name: r for name, r in ranks.items() if r != base_rank},
        "alpha_pattern": {name: r for name, r in ranks.items() if r != base_rank},
        "target_modules": names,
        "lora_dropout": plan["lora_dropout"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": heads or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PEFT_WEIGHTS_NAME) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    write_text_atomic(out / PEFT_CONFIG_NAME, json.dumps(peft_config, indent=2) + "\n")
    return out


def _refuse_overwriting_an_adapter(folder: Path, out: Path) -> None:
    """PEFT's weights file has our adapter's file name: an export into an alphalora adapter folder (the source
    itself, say) would replace that adapter's weights and leave a folder neither loader reads."""
    if out.resolve() == folder.resolve() or (out / CONFIG_NAME).exists():
        raise AdapterError(f"{out} holds an alphalora adapter, whose {PEFT_WEIGHTS_NAME} the export would overwrite; "
                           "export into a new folder (--out DIR)")


def _task_type(config: dict, heads: list[str]) -> str | None:
    """PEFT's task_type, which picks the PeftModel class that wraps the base: SEQ_CLS with a classifier head,
    CAUSAL_LM for a model that generates (adapters saved before `can_generate` was recorded count as one), and
    none (PEFT's plain PeftModel) for the others, e.g. a BertModel, which PeftModelForCausalLM cannot wrap."""
    if any(h.rpartition(".")[2] in CLASSIFIER_HEADS for h in heads):
        return "SEQ_CLS"
    return "CAUSAL_LM" if config.get("can_generate", True) else None


def _peft_moe_leaves(model_type: str | None) -> set[str]:
    """The module leaves PEFT (on transformers 5) re-targets onto the fused experts of a `model_type` model when it
    loads a LoRA config (peft.utils.transformers_weight_conversion: `mixtral` w1/w2/w3/gate; Qwen3-MoE, OLMoE,
    DeepSeek-V2/3, GLM-4-MoE, ... gate_proj/up_proj/down_proj/gate); empty where PEFT does not, or is not installed."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except Exception:  # noqa: BLE001 - no PEFT, or a PEFT without the conversion: nothing is re-targeted
        return set()
    return set(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))


def _refuse_peft_moe_retargeting(folder: Path, config: dict, names: list[str]) -> None:
    """PEFT maps every target named like a v4 expert projection (any `...down_proj` of a Qwen3-MoE, the dense MLP
    of its `mlp_only_layers` and DeepSeek's shared experts included) onto the fused 3-D expert parameters, so such
    an export would fail to load or put the LoRA on the experts: refused, naming the modules."""
    model_type = (config.get("base_config") or {}).get("model_type")
    leaves = _peft_moe_leaves(model_type)
    clashing = [name for name in names if name.rpartition(".")[2] in leaves]
    if clashing:
        raise AdapterError(
            f"{folder} adapts {clashing[:3]}{' ...' if len(clashing) > 3 else ''} of a {model_type} model, which PEFT "
            f"on transformers 5 re-targets onto the fused experts' parameters ({sorted(leaves)}), so PEFT could not "
            "load the export as trained; serve it with the native engine (`alphalora serve`), or allocate without "
            "those modules (e.g. --target-modules q,k,v,o)"
        )
