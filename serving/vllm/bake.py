"""A "baked" model folder: the base model plus one MoE-LoRA adapter, for the vLLM plugin to serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from alphalora.adapters.inject import AdapterError
from alphalora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, base_fingerprint, check_weights_file, read_adapter_config

ADAPTER_SUBDIR = "alphalora_adapter"  # the plugin reads the adapter from here (moe_model.ADAPTER_SUBDIR)
# Hugging Face model_type -> the plugin's architecture name (plugin.ARCHITECTURES)
PLUGIN_ARCHITECTURES = {
    "llama": "AlphaLoRAMoELlamaForCausalLM",
    "mistral": "AlphaLoRAMoEMistralForCausalLM",
    "qwen2": "AlphaLoRAMoEQwen2ForCausalLM",
    "qwen3": "AlphaLoRAMoEQwen3ForCausalLM",
    "phi3": "AlphaLoRAMoEPhi3ForCausalLM",
    "mixtral": "AlphaLoRAMoEMixtralForCausalLM",
    "qwen2_moe": "AlphaLoRAMoEQwen2MoeForCausalLM",
    "qwen3_moe": "AlphaLoRAMoEQwen3MoeForCausalLM",
    "gemma": "AlphaLoRAMoEGemmaForCausalLM",
    "gemma2": "AlphaLoRAMoEGemma2ForCausalLM",
    "gemma3_text": "AlphaLoRAMoEGemma3ForCausalLM",
}
PLUGIN_MODULES = {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                  "down_proj"}
NATIVE = "serve it with the native engine (`alphalora serve --engine native`)"


def check_bakeable(model_dir: str | Path, adapter_dir: str | Path) -> dict:
    """The adapter's config if the plugin can serve it on this base model; AdapterError otherwise."""
    from transformers import AutoConfig

    config = read_adapter_config(adapter_dir)
    check_weights_file(Path(adapter_dir), config)  # the plugin reads the file itself: a damaged one is refused here
    plan = config["plan"]
    base = AutoConfig.from_pretrained(model_dir)
    if base.model_type not in PLUGIN_ARCHITECTURES:
        raise AdapterError(f"the vLLM MoE-LoRA plugin serves the {sorted(PLUGIN_ARCHITECTURES)} families, not "
                           f"{base.model_type!r}; {NATIVE}")
    if plan.get("modules_to_save"):
        raise AdapterError(f"{adapter_dir} trains {plan['modules_to_save']} as well (modules_to_save), which vLLM "
                           f"cannot serve; {NATIVE}")
    if plan.get("shortcuts"):
        raise AdapterError(f"{adapter_dir} has LoRA shortcut connections, which vLLM cannot run; {NATIVE}")
    if plan.get("router", {}).get("renormalize") is False:
        raise AdapterError(f"{adapter_dir} was trained with un-renormalised router gates (router.renormalize "
                           "false), which neither engine serves: their expert kernels renormalise the top-k gates")
    if plan.get("router", {}).get("type") == "shared":
        raise AdapterError(f"{adapter_dir} uses a shared (per-layer) router, which the vLLM plugin does not "
                           f"implement; {NATIVE}")
    leaves = {name.rpartition(".")[2] for name in config["module_names"]}
    if leaves - PLUGIN_MODULES:
        raise AdapterError(f"{adapter_dir} adapts {sorted(leaves - PLUGIN_MODULES)}, which the vLLM plugin does not; "
                           f"{NATIVE}")
    if config["base_fingerprint"] != base_fingerprint(SimpleNamespace(config=base)):
        raise AdapterError(f"adapter {adapter_dir} was trained on {config['base_model']!r}, whose architecture "
                           f"differs from {model_dir}; bake it into the base model it was trained with")
    return config


def bake_moe_model(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Writes OUT: links to the base model's files, the adapter in OUT/alphalora_adapter, and a
    config.json whose `architectures` names the plugin's class. Returns OUT."""
    model, out = Path(model_dir).resolve(), Path(out_dir)
    check_bakeable(model, adapter_dir)
    config = json.loads((model / "config.json").read_text())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in model.iterdir():
        if item.name != "config.json":
            (tmp / item.name).symlink_to(item)
    config["architectures"] = [PLUGIN_ARCHITECTURES[config["model_type"]]]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / ADAPTER_SUBDIR).mkdir()
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(Path(adapter_dir) / name, tmp / ADAPTER_SUBDIR / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
