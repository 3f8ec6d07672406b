"""vLLM models with one MoE-LoRA adapter baked in: Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 1 to 3 and the
mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE (loaded by the plugin).

A baked model folder is the base model's folder plus `alphalora_adapter/` (our adapter folder) and
a config.json whose `architectures` names one of these classes (see `bake.py`). The base model is
vLLM's own class, unchanged; a forward hook on each adapted vLLM linear (qkv_proj, o_proj,
gate_up_proj, down_proj) adds the mixture of every Hugging Face module fused into it to that
module's slice of the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.gemma import GemmaForCausalLM
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.phi3 import Phi3ForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from .bake import ADAPTER_SUBDIR
from .mixture import build_mixtures


class MoELoRAMixin:
    """Adds the adapter in `<model>/alphalora_adapter` to a vLLM causal LM of the Llama family (the class
    after the mixin among the bases), whose linears are qkv_proj, o_proj, gate_up_proj and down_proj."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_adapter(vllm_config)

    def _attach_adapter(self, vllm_config) -> None:
        self._alphalora_dir = Path(vllm_config.model_config.model) / ADAPTER_SUBDIR
        config = json.loads((self._alphalora_dir / "alphalora_config.json").read_text())
        with safe_open(str(self._alphalora_dir / "adapter_model.safetensors"), "pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        switched_off = set(config["plan"].get("disabled_modules", []))  # a dynamic HeteroLoRA checkpoint
        names = [name for name in config["module_names"] if name not in switched_off]
        mixtures = build_mixtures(names, shapes, config["plan"], dict(self.named_modules()),
                                  vllm_config.model_config.dtype, tensor_model_parallel_all_reduce)
        self.alphalora = nn.ModuleDict()
        for name, mixture in mixtures.items():
            self.alphalora[name.replace(".", "__")] = mixture
            self.get_submodule(name).register_forward_hook(mixture.hook)

    def _load_adapter(self) -> set[str]:
        """Copies this rank's share of the adapter weights into the mixtures; returns the loaded names."""
        tensors = _weights(self._alphalora_dir)
        loaded = set()
        for key, linear_mixture in self.alphalora.items():
            for spec, mixture in zip(linear_mixture.specs, linear_mixture.mixtures, strict=True):
                mixture.load(spec, tensors[f"{spec.name}.lora_A"], tensors[f"{spec.name}.lora_B"],
                             tensors.get(f"{spec.name}.router.weight"))
            loaded |= {f"alphalora.{key}.{name}" for name, _ in linear_mixture.named_parameters()}
        return loaded

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        return set(loaded) | self._load_adapter()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


class MoELoRALlamaForCausalLM(MoELoRAMixin, LlamaForCausalLM):
    """Llama with a baked MoE-LoRA adapter."""


class MoELoRAMistralForCausalLM(MoELoRAMixin, MistralForCausalLM):
    """Mistral with a baked MoE-LoRA adapter."""


class MoELoRAQwen2ForCausalLM(MoELoRAMixin, Qwen2ForCausalLM):
    """Qwen2 with a baked MoE-LoRA adapter."""


class MoELoRAQwen3ForCausalLM(MoELoRAMixin, Qwen3ForCausalLM):
    """Qwen3 with a baked MoE-LoRA adapter (its per-head q/k norms are vLLM's own, after the hooked qkv_proj)."""


class MoELoRAPhi3ForCausalLM(MoELoRAMixin, Phi3ForCausalLM):
    """Phi-3 with a baked MoE-LoRA adapter: its own fused qkv_proj and gate_up_proj are vLLM's, one mixture each."""


class MoELoRAMixtralForCausalLM(MoELoRAMixin, MixtralForCausalLM):
    """Mixtral with a baked MoE-LoRA adapter on its attention (its experts are vLLM's fused MoE, unadapted)."""


class MoELoRAQwen2MoeForCausalLM(MoELoRAMixin, Qwen2MoeForCausalLM):
    """Qwen2-MoE with a baked MoE-LoRA adapter on its attention and shared expert."""


class MoELoRAQwen3MoeForCausalLM(MoELoRAMixin, Qwen3MoeForCausalLM):
    """Qwen3-MoE with a baked MoE-LoRA adapter on its attention and dense MLP blocks (mlp_only_layers)."""


class MoELoRAGemmaForCausalLM(MoELoRAMixin, GemmaForCausalLM):
    """Gemma with a baked MoE-LoRA adapter."""


class MoELoRAGemma2ForCausalLM(MoELoRAMixin, Gemma2ForCausalLM):
    """Gemma 2 with a baked MoE-LoRA adapter (soft-capping and the sandwich norms are vLLM's own)."""


class MoELoRAGemma3ForCausalLM(MoELoRAMixin, Gemma3ForCausalLM):
    """Gemma 3 (text) with a baked MoE-LoRA adapter."""
