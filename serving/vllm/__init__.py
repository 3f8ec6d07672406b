"""Hand-off to real vLLM: launching its OpenAI server with our adapters, and its MoE-LoRA plugin."""
