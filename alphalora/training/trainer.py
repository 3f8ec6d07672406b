"""`transformers.Trainer` for MoE-LoRA adapters: aux loss, adapter-only checkpoints, resume."""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import Trainer

from alphalora.adapters.inject import adapter_state
from alphalora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter_weights, save_adapter

# What `resume_from_checkpoint` reads; Trainer writes trainer_state.json last.
CHECKPOINT_FILES = (WEIGHTS_NAME, CONFIG_NAME, "optimizer.pt", "scheduler.pt", "trainer_state.json")


class CheckpointError(ValueError):
    """An output folder that cannot be trained into, or no checkpoint of this run to resume from: the message
    names the folder and what to do."""


class MoELoRATrainer(Trainer):
    """Adds the routers' load-balancing loss and saves only the adapter (not the frozen base).

    Checkpoints hold the adapter plus Trainer's optimizer, scheduler and RNG state, so
    `resume_from_checkpoint` continues a killed run where it stopped; `write_run_record(folder)`, when
    given, adds what resuming checks and restores (the run's settings, dynamic HeteroLoRA's rounds).
    """

    def __init__(self, *args, write_run_record: Callable[[str], Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.write_run_record = write_run_record
        self._aux_total, self._aux_count = 0.0, 0  # aux losses of the micro-batches since the last log
        # Trainer takes a model whose forward accepts **kwargs to normalise its loss by the item count of
        # the whole accumulated batch (num_items_in_batch), and then does not divide it by the accumulation
        # steps. Sequence classifiers (BERT's included) accept **kwargs but average each micro-batch on
        # their own: their losses would be summed over the micro-batches. Only a loss function that takes
        # num_items_in_batch counts.
        if self.model_accepts_loss_kwargs and not _loss_uses_item_count(self.accelerator.unwrap_model(self.model)):
            self.model_accepts_loss_kwargs = False

    def _task_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Trainer's rule (training_step) for whether compute_loss's loss is already scaled for accumulation.
        Newer transformers let a subclass state it (`loss_is_scaled_for_ga`); older ones only apply the rule."""
        stated = getattr(self, "loss_is_scaled_for_ga", None)
        if stated is not None:
            return stated
        return ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                or getattr(self, "compute_loss_func", None) is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        state = adapter_state(self.accelerator.unwrap_model(model))
        aux = state.aux_loss()
        coef = state.plan.router.aux_loss_coef
        if aux is not None and coef > 0 and model.training:
            # A task loss normalised over the whole accumulated batch is not divided by the accumulation
            # steps in training_step, so the per-micro-batch aux loss is divided here (the aux loss of a
            # step is then the mean over its micro-batches). Otherwise training_step divides the sum.
            scaled = self._task_loss_scaled_for_ga(num_items_in_batch)
            steps = self.current_gradient_accumulation_steps if scaled else 1
            loss = loss + coef * aux / steps
            # summed where it is: reading it to the host here would make the host wait for the forward to finish
            # on the GPU before it could queue the backward
            self._aux_total = aux.detach().float() + self._aux_total
            self._aux_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._aux_count and "loss" in logs:
            # The mean over the micro-batches actually accumulated: after a resume, or at a last partial
            # logging interval, fewer than logging_steps x gradient_accumulation_steps.
            logs["aux_loss"] = round(float(self._aux_total) / self._aux_count, 6)
            self._aux_total, self._aux_count = 0.0, 0
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        folder = output_dir or self.args.output_dir
        save_adapter(self.accelerator.unwrap_model(self.model), folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        if self.write_run_record is not None:  # before trainer_state.json, which marks a checkpoint complete
            self.write_run_record(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_weights(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and os.path.isdir(best):
            load_adapter_weights(self.model, best)


def _loss_uses_item_count(model) -> bool:
    """Whether the model's loss function normalises by num_items_in_batch (transformers' causal and
    masked LM losses do; its sequence-classification loss, and BERT's own, average per batch)."""
    loss_function = getattr(model, "loss_function", None)
    if loss_function is None:
        return True  # not a transformers model: keep Trainer's reading of its forward
    try:
        return "num_items_in_batch" in inspect.signature(loss_function).parameters
    except (TypeError, ValueError):
        return True


def checkpoint_paths(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint-N entries in `folder` (none where it does not exist), oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    steps = {p: int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    return sorted(steps, key=steps.get)


def last_complete_checkpoint(folder: str | os.PathLike) -> tuple[Path | None, dict[Path, list[str]]]:
    """(the newest checkpoint-N in `folder` holding everything resuming reads, {newer incomplete checkpoint:
    the files it lacks}). A run killed while Trainer was writing checkpoint-N leaves it partial."""
    incomplete: dict[Path, list[str]] = {}
    for path in reversed([p for p in checkpoint_paths(folder) if p.is_dir()]):
        missing = _missing_checkpoint_files(path)
        if not missing:
            return path, incomplete
        incomplete[path] = missing
    return None, incomplete


def _missing_checkpoint_files(path: Path) -> list[str]:
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if "trainer_state.json" not in missing:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            missing.append("a readable trainer_state.json")
    return missing
