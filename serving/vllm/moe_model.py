"""vLLM models with one MoE-LoRA adapter baked in: Llama, Mistral and Qwen2 (loaded by the plugin).

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
from safetensors.torch import load_file
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .mixture import LinearMixture, ModuleMixture, SliceSpec

ADAPTER_SUBDIR = "alphalora_adapter"
# Hugging Face module -> (vLLM linear, slice index in the fused output)
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
         "o_proj": ("o_proj", None), "down_proj": ("down_proj", None)}


def _column_slices(linear: nn.Module) -> list[tuple[int, int, int]]:
    """(offset in the local output, local size, first full-output row) of each fused slice."""
    rank = linear.tp_rank
    if hasattr(linear, "num_kv_heads"):  # QKVParallelLinear
        q, kv = linear.num_heads * linear.head_size, linear.num_kv_heads * linear.head_size
        kv_rank = rank // linear.num_kv_head_replicas
        return [(0, q, rank * q), (q, kv, kv_rank * kv), (q + kv, kv, kv_rank * kv)]
    sizes = [size // linear.tp_size for size in linear.output_sizes]
    return [(sum(sizes[:i]), size, rank * size) for i, size in enumerate(sizes)]


def _slice_spec(hf_name: str, linear: nn.Module, index: int | None) -> SliceSpec:
    if index is not None:
        offset, size, start = _column_slices(linear)[index]
        return SliceSpec(hf_name, offset, size, (start, start + size))
    out = linear.output_size
    cols = linear.input_size_per_partition
    start = linear.tp_rank * cols
    return SliceSpec(hf_name, 0, out, (0, out), (start, start + cols))


class MoELoRAMixin:
    """Adds the adapter in `<model>/alphalora_adapter` to a vLLM causal LM of the Llama family."""

    def _attach_adapter(self, vllm_config) -> None:
        folder = Path(vllm_config.model_config.model) / ADAPTER_SUBDIR
        config = json.loads((folder / "alphalora_config.json").read_text())
        plan = config["plan"]
        self._alphalora_dir = folder
        dtype = vllm_config.model_config.dtype
        shapes = {name: tuple(t.shape) for name, t in _weights(folder).items()}
        grouped: dict[str, list[tuple[SliceSpec, ModuleMixture]]] = {}
        modules = dict(self.named_modules())
        for hf_name in config["module_names"]:
            parent, _, leaf = hf_name.rpartition(".")
            if leaf not in FUSED:
                raise ValueError(f"{hf_name}: the vLLM plugin adapts {sorted(FUSED)} only")
            target, index = FUSED[leaf]
            linear = modules.get(f"{parent}.{target}")
            if linear is None:  # a layer held by another pipeline stage
                continue
            spec = _slice_spec(hf_name, linear, index)
            experts, rank, _ = shapes[f"{hf_name}.lora_A"]
            layer = int(hf_name.split(".layers.")[1].split(".")[0])
            width = spec.cols[1] - spec.cols[0] if spec.cols else shapes[f"{hf_name}.lora_A"][2]
            mixture = ModuleMixture(experts, plan["top_k_per_layer"][layer], rank, width, spec.rows[1] - spec.rows[0],
                                    plan["lora_alpha"] / rank, dtype)
            grouped.setdefault(f"{parent}.{target}", []).append((spec, mixture))
        self.alphalora = nn.ModuleDict()
        for linear_name, entries in grouped.items():
            linear = modules[linear_name]
            entries.sort(key=lambda entry: entry[0].offset)
            row_parallel = entries[0][0].cols is not None and linear.tp_size > 1
            out_width = linear.output_size_per_partition if entries[0][0].cols is None else linear.output_size
            mixture = LinearMixture([s for s, _ in entries], [m for _, m in entries], out_width,
                                    tensor_model_parallel_all_reduce if row_parallel else None)
            self.alphalora[linear_name.replace(".", "__")] = mixture
            linear.register_forward_hook(mixture.hook)

    def _load_adapter(self) -> set[str]:
        """Copies this rank's share of the adapter weights into the mixtures; returns the loaded names."""
        tensors = _weights(self._alphalora_dir)
        loaded = set()
        for key, linear_mixture in self.alphalora.items():
            for spec, mixture in zip(linear_mixture.specs, linear_mixture.mixtures, strict=True):
                a, b = tensors[f"{spec.name}.lora_A"], tensors[f"{spec.name}.lora_B"]  # (E, r, in), (E, out, r)
                router = tensors.get(f"{spec.name}.router.weight")  # (E, in)
                if spec.cols is not None:
                    a = a[:, :, spec.cols[0]: spec.cols[1]]
                    router = router[:, spec.cols[0]: spec.cols[1]] if router is not None else None
                b = b[:, spec.rows[0]: spec.rows[1], :]
                with torch.no_grad():
                    mixture.lora_A.copy_(a.reshape(-1, a.shape[-1]))
                    mixture.lora_B.copy_(b.permute(1, 0, 2).reshape(b.shape[1], -1))
                    if mixture.router is not None:
                        mixture.router.copy_(router)
            loaded |= {f"alphalora.{key}.{name}" for name, _ in linear_mixture.named_parameters()}
        return loaded

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        return set(loaded) | self._load_adapter()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


class MoELoRALlamaForCausalLM(MoELoRAMixin, LlamaForCausalLM):
    """Llama with a baked MoE-LoRA adapter."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_adapter(vllm_config)


class MoELoRAMistralForCausalLM(MoELoRAMixin, MistralForCausalLM):
    """Mistral with a baked MoE-LoRA adapter."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_adapter(vllm_config)


class MoELoRAQwen2ForCausalLM(MoELoRAMixin, Qwen2ForCausalLM):
    """Qwen2 with a baked MoE-LoRA adapter."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_adapter(vllm_config)
