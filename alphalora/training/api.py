"""`train`: a base model + a plan + data -> a trained adapter folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alphalora._io import write_text_atomic
from alphalora.adapters.inject import CLASSIFIER_HEADS, AdapterError, inject_adapters
from alphalora.adapters.io import save_adapter
from alphalora.allocation.plan import Plan, is_positive_int
from alphalora.model_source import is_hub_id, model_folder

from .data import (
    TASKS,
    DataError,
    ListDataset,
    collate,
    count_classes,
    read_rows,
    tokenize_causal_lm,
    tokenize_classification,
)

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers' names


@dataclass
class TrainResult:
    adapter_dir: Path
    log_history: list[dict[str, Any]]
    label_names: list[str] | None
    reallocations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # dynamic HeteroLoRA rounds
    main_process: bool = True  # False on the other processes of a distributed run (they write nothing)


def _load_base(model_dir: str | Path, task: str, num_labels: int | None, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    folder = model_folder(model_dir, DataError)
    if not (folder / "config.json").exists():
        raise DataError(f"model folder {folder} has no config.json; pass a Hugging Face model folder or Hub id")
    # A Hub id is loaded by its id (now cached), so the model and the adapters trained on it carry that name
    source = str(model_dir) if is_hub_id(model_dir) else folder
    tokenizer = AutoTokenizer.from_pretrained(source)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _context_length(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(model.config, "n_positions", None)]
    if 0 < (tokenizer.model_max_length or 0) < 10**9:
        limits.append(tokenizer.model_max_length)
    limits = [v for v in limits if v]
    return min(limits) if limits else 2048


def _tokenize(path, task, tokenizer, max_length, label_names=None, truncate=False, num_labels=None):
    rows = read_rows(path)
    if task == "causal-lm":
        return tokenize_causal_lm(rows, tokenizer, max_length, str(path), truncate)
    tokenized = tokenize_classification(rows, tokenizer, max_length, str(path), label_names, truncate)
    beyond = sorted({e["labels"] for e in tokenized.examples if num_labels is not None and e["labels"] >= num_labels})
    if beyond:
        raise DataError(f"{path} has labels {beyond[:5]}, but the training data defines {num_labels} classes "
                        f"(indices 0 to {num_labels - 1})")
    return tokenized


def load_model_and_data(model_dir: str | Path, data: str | Path, task: str, *, max_length: int | None = None,
                        bf16: bool = False, truncate: bool = False):
    """(model, tokenizer, tokenised training data, label names, max_length) for `task`, data checked first.
    With `truncate`, rows longer than max_length are cut (see `tokenize_causal_lm`) instead of refused."""
    import torch

    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise DataError(f"max_length must be a positive number of tokens, got {max_length!r}")
    label_names = None
    num_labels = None
    if task == "classification":
        probe = tokenize_classification(read_rows(data), _NullTokenizer(), 10**9, str(data))
        label_names = probe.label_names
        num_labels = count_classes(probe, str(data))
    model, tokenizer = _load_base(model_dir, task, num_labels, torch.bfloat16 if bf16 else torch.float32)
    limit = _context_length(model, tokenizer)
    if max_length is not None and max_length > limit:
        raise DataError(f"--max-length {max_length} exceeds the model's context of {limit}")
    max_length = max_length or limit
    train_set = _tokenize(data, task, tokenizer, max_length, label_names, truncate)
    return model, tokenizer, train_set, label_names, max_length


def train(
    model_dir: str | Path,
    plan: Plan | str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    task: str = "causal-lm",
    eval_data: str | Path | None = None,
    epochs: float = 1.0,
    max_steps: int = -1,
    learning_rate: float = 3e-4,
    lr_scheduler: str = "linear",
    warmup_ratio: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    max_length: int | None = None,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    save_steps: int = 50,
    logging_steps: int = 10,
    resume: bool = False,
    progress: bool = True,
    callbacks: list | None = None,
    truncate: bool = False,
) -> TrainResult:
    """Trains the plan's MoE-LoRA (or heterogeneous-rank LoRA) adapter on `data`.

    Data and plan are checked before any training starts. Checkpoints (adapter, optimizer,
    scheduler, RNG) go to out_dir/checkpoints; `resume=True` continues from the newest complete one
    (a checkpoint a kill cut short is skipped, and said so). `truncate=True` cuts rows longer than
    `max_length` (causal LM: their start, keeping the completion; see `tokenize_causal_lm`) instead of
    refusing them. The finished adapter is written to out_dir. Under torchrun or accelerate every process calls
    this and trains data parallel; only the main one writes (`TrainResult.main_process`).
    """
    import torch
    from transformers import TrainingArguments, set_seed

    from .trainer import MoELoRATrainer

    _check_numbers(epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
                   gradient_accumulation_steps=gradient_accumulation_steps, save_steps=save_steps,
                   logging_steps=logging_steps)
    if lr_scheduler not in LR_SCHEDULERS:
        raise DataError(f"unknown lr_scheduler {lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    if not 0 <= warmup_ratio < 1 or weight_decay < 0:
        raise DataError(f"need 0 <= warmup_ratio < 1 and weight_decay >= 0, got {warmup_ratio} and {weight_decay}")
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if gradient_checkpointing and plan.shortcuts:
        raise AdapterError("LoRA shortcut connections read activations across blocks, which gradient checkpointing "
                           "recomputes block by block; train this plan without --gradient-checkpointing")
    set_seed(seed)  # a new task head (classification) is initialised while loading: same seed, same head
    model, tokenizer, train_set, label_names, max_length = load_model_and_data(
        model_dir, data, task, max_length=max_length, bf16=bf16, truncate=truncate)
    num_labels = model.config.num_labels if task == "classification" else None
    eval_set = _tokenize(eval_data, task, tokenizer, max_length, label_names, truncate, num_labels) \
        if eval_data else None
    if task == "classification":
        heads = [h for h in CLASSIFIER_HEADS if hasattr(model, h)]
        plan = dataclasses.replace(plan, modules_to_save=sorted(set(plan.modules_to_save) | set(heads)))
    set_seed(seed)  # adapter initialisation is part of the run: the same seed, the same adapter
    inject_adapters(model, plan)  # raises AdapterError if the plan does not fit this model
    reallocation = _reallocation_callback(model, plan, train_set.examples, tokenizer.pad_token_id)

    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler, weight_decay=weight_decay, **_warmup_argument(warmup_ratio),
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, seed=seed, data_seed=seed,
        logging_steps=logging_steps, save_strategy="steps", save_steps=save_steps,
        eval_strategy="epoch" if eval_set else "no", report_to="none", disable_tqdm=not progress,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=_has_idle_adapters(model, plan), **_checkpointing_argument(gradient_checkpointing),
    )
    all_callbacks = list(callbacks or [])
    if reallocation is not None:
        all_callbacks.append(reallocation)
    trainer = MoELoRATrainer(
        model=model, args=args, train_dataset=ListDataset(train_set.examples),
        eval_dataset=ListDataset(eval_set.examples) if eval_set else None,
        data_collator=collate(tokenizer.pad_token_id), processing_class=tokenizer, callbacks=all_callbacks,
        compute_metrics=classification_accuracy if task == "classification" else None,
    )
    last = _resume_point(checkpoints) if resume else None
    trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    rounds = reallocation.history if reallocation is not None else []
    main_process = trainer.is_world_process_zero()  # under torchrun / accelerate, one process writes
    if main_process:
        save_adapter(model, out, drop_disabled=True)
        tokenizer.save_pretrained(out)
        write_text_atomic(out / "trainer_log.json", json.dumps(
            {"log_history": trainer.state.log_history, "label_names": label_names, "reallocations": rounds},
            indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()  # every process returns with the adapter on disk
    return TrainResult(out, trainer.state.log_history, label_names, rounds, main_process)


def _resume_point(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (None: none yet, start afresh); says which, and what it skipped."""
    from .trainer import CheckpointError, last_complete_checkpoint

    if not checkpoints.is_dir():
        print(f"no checkpoint in {checkpoints}: starting from the beginning")
        return None
    last, incomplete = last_complete_checkpoint(checkpoints)
    for path, missing in incomplete.items():
        print(f"{path.name} is incomplete (no {', '.join(missing)}; the run was probably stopped while saving it): "
              "skipped")
    if last is None and incomplete:
        raise CheckpointError(f"no complete checkpoint to resume from in {checkpoints}: "
                              f"{', '.join(p.name for p in incomplete)} lack files resuming needs; delete "
                              "the checkpoints folder (or train without --resume) to start from the beginning")
    if last is None:
        print(f"no checkpoint in {checkpoints}: starting from the beginning")
    else:
        print(f"resuming from {last}")
    return last


def _check_numbers(**values) -> None:
    """Refuses counts and rates that transformers would fail on later (or silently misread)."""
    positive_ints = ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps")
    for name in positive_ints:
        value = values[name]
        if not is_positive_int(value):
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    steps = values["max_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == -1 or steps >= 1):
        raise DataError(f"max_steps must be a positive number of steps, or -1 to train for `epochs`; got {steps!r}")
    if not values["epochs"] > 0:
        raise DataError(f"epochs must be positive, got {values['epochs']!r}")
    if not values["learning_rate"] >= 0:
        raise DataError(f"learning_rate must be >= 0, got {values['learning_rate']!r}")


def classification_accuracy(prediction) -> dict[str, float]:
    """Trainer's compute_metrics for sequence classification: the share of evaluation examples whose
    highest logit is their label (logged as eval_accuracy beside eval_loss)."""
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == prediction.label_ids))}


def _has_idle_adapters(model, plan: Plan) -> bool:
    """Whether some adapter weights may get no gradient in a step (modules HeteroLoRA switched off, or
    switches on and off during training): distributed data parallel must then look for them every
    step; otherwise that search is wasted work (and a warning)."""
    from alphalora.adapters.inject import adapter_state

    modules = adapter_state(model).switchable_modules(model).values()
    return plan.reallocation is not None or any(not module.enabled for module in modules)


def _reallocation_callback(model, plan: Plan, examples, pad_id):
    """Dynamic HeteroLoRA's callback when the plan asks for it. Its budget, rank and pools are checked
    against this model's candidates, and the proxy data against `examples`, here, before training."""
    settings = plan.reallocation
    if settings is None:
        return None
    from alphalora.allocation import AllocationError
    from alphalora.allocation.hetero import candidates_of, first_minibatches, select

    from .reallocation import ReallocationCallback

    candidates = candidates_of(model)
    try:  # a selection on equal scores runs every round's checks: rank (check_ranks), budget, pool split
        select(candidates, dict.fromkeys((c.name for c in candidates), 1.0), settings.budget, [plan.rank],
               pools=settings.pools, shortcut_share=settings.shortcut_share, seed=settings.seed)
    except AllocationError as error:
        raise AllocationError(f"the plan's dynamic reallocation does not fit this model: {error}; for this plan, "
                              "re-allocate on this model or edit the plan's rank and reallocation fields") from error
    batches = first_minibatches(examples, pad_id, settings.batches, settings.batch_size, settings.proxy,
                                fix="re-allocate with fewer --proxy-batches or a smaller --proxy-batch-size, lower "
                                "the plan's reallocation.batches or reallocation.batch_size, or train on more data")
    return ReallocationCallback(model, settings, batches, plan.rank)


def _training_argument_names() -> set[str]:
    """The fields of this transformers' TrainingArguments (some were renamed across major versions)."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


def _warmup_argument(ratio: float) -> dict[str, float]:
    """transformers 5 folded warmup_ratio into warmup_steps (a float below 1 is a share of the steps)."""
    return {"warmup_ratio": ratio} if "warmup_ratio" in _training_argument_names() else {"warmup_steps": ratio}


def _checkpointing_argument(enabled: bool) -> dict[str, Any]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    renamed = "activation_checkpointing" in _training_argument_names()
    name = "activation_checkpointing" if renamed else "gradient_checkpointing"
    # Non-reentrant: the routers' logits inside a checkpointed block keep their graph, so the aux
    # loss reaches the routers (transformers 4.x defaulted to the reentrant form, which drops it).
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}} if enabled else {}


class _NullTokenizer:
    """Lets the label scan reuse the classification reader before the real tokenizer is loaded."""

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return {"input_ids": []}
