"""`transformers.Trainer` for MoE-LoRA adapters: aux loss, adapter-only checkpoints, resume."""

from __future__ import annotations

import os

from transformers import Trainer

from alphalora.adapters.inject import adapter_state
from alphalora.adapters.io import load_adapter_weights, save_adapter


class MoELoRATrainer(Trainer):
    """Adds the routers' load-balancing loss and saves only the adapter (not the frozen base).

    Checkpoints hold the adapter plus Trainer's optimizer, scheduler and RNG state, so
    `resume_from_checkpoint` continues a killed run where it stopped.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        state = adapter_state(self.accelerator.unwrap_model(model))
        aux = state.aux_loss()
        coef = state.plan.router.aux_loss_coef
        if aux is not None and coef > 0 and model.training:
            # The task loss of a causal LM is normalised over the whole accumulated batch, so
            # Trainer does not divide it by the accumulation steps; a per-micro-batch aux loss
            # must be divided here, or it would count accumulation-steps times.
            steps = self.current_gradient_accumulation_steps if self.model_accepts_loss_kwargs else 1
            loss = loss + coef * aux / steps
            self._aux_total = getattr(self, "_aux_total", 0.0) + float(aux.detach())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        aux = getattr(self, "_aux_total", None)
        if aux is not None and "loss" in logs:
            logs["aux_loss"] = round(aux / max(1, self.args.logging_steps * self.args.gradient_accumulation_steps), 6)
            self._aux_total = 0.0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.isdir(best):
            load_adapter_weights(self.model, best)
