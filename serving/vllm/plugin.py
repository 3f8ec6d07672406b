"""The `vllm.general_plugins` entry point: registers the MoE-LoRA model classes with vLLM."""

from __future__ import annotations

# Architecture name in a baked model's config.json -> class in alphalora.serving.vllm.moe_model.
ARCHITECTURES = {
    "AlphaLoRAMoELlamaForCausalLM": "MoELoRALlamaForCausalLM",
    "AlphaLoRAMoEMistralForCausalLM": "MoELoRAMistralForCausalLM",
    "AlphaLoRAMoEQwen2ForCausalLM": "MoELoRAQwen2ForCausalLM",
    "AlphaLoRAMoEQwen3ForCausalLM": "MoELoRAQwen3ForCausalLM",
    "AlphaLoRAMoEPhi3ForCausalLM": "MoELoRAPhi3ForCausalLM",
    "AlphaLoRAMoEMixtralForCausalLM": "MoELoRAMixtralForCausalLM",
    "AlphaLoRAMoEQwen2MoeForCausalLM": "MoELoRAQwen2MoeForCausalLM",
    "AlphaLoRAMoEQwen3MoeForCausalLM": "MoELoRAQwen3MoeForCausalLM",
    "AlphaLoRAMoEGemmaForCausalLM": "MoELoRAGemmaForCausalLM",
    "AlphaLoRAMoEGemma2ForCausalLM": "MoELoRAGemma2ForCausalLM",
    "AlphaLoRAMoEGemma3ForCausalLM": "MoELoRAGemma3ForCausalLM",
}


def register() -> None:
    """Registers every MoE-LoRA architecture lazily (by import path); safe to call in every process."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, cls in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"alphalora.serving.vllm.moe_model:{cls}")
