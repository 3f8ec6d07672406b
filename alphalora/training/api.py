"""`train`: a base model + a plan + data -> a trained adapter folder."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alphalora._io import write_text_atomic
from alphalora._numbers import is_number, is_positive_int, takes_numpy_scalars
from alphalora.adapters.inject import CLASSIFIER_HEADS, AdapterError, inject_adapters
from alphalora.adapters.io import save_adapter
from alphalora.allocation.plan import Plan, PlanFormatError

from .data import (
    EVAL_SPLITS,
    TASKS,
    TRAIN_SPLITS,
    DataError,
    ListDataset,
    collate,
    count_classes,
    read_rows,
    tokenize_causal_lm,
    tokenize_classification,
    warn_if_classification_rows,
)
from .model import load_base, warn_if_plan_for_another_model

LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")  # transformers' names


@dataclass
class TrainResult:
    adapter_dir: Path
    log_history: list[dict[str, Any]]
    label_names: list[str] | None
    reallocations: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # dynamic HeteroLoRA rounds
    main_process: bool = True  # False on the other processes of a distributed run (they write nothing)


def _context_length(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(model.config, "n_positions", None)]
    if 0 < (tokenizer.model_max_length or 0) < 10**9:
        limits.append(tokenizer.model_max_length)
    limits = [v for v in limits if v]
    return min(limits) if limits else 2048


def _tokenize(path, task, tokenizer, max_length, label_names=None, truncate=False, num_labels=None,
              splits=TRAIN_SPLITS):
    rows = read_rows(path, splits)
    if task == "causal-lm":
        warn_if_classification_rows(rows, str(path))
        return tokenize_causal_lm(rows, tokenizer, max_length, str(path), truncate)
    tokenized = tokenize_classification(rows, tokenizer, max_length, str(path), label_names, truncate)
    beyond = sorted({e["labels"] for e in tokenized.examples if num_labels is not None and e["labels"] >= num_labels})
    if beyond:
        raise DataError(f"{path} has labels {beyond[:5]}, but the training data defines {num_labels} classes "
                        f"(indices 0 to {num_labels - 1})")
    return tokenized


def _check_task_and_length(task: Any, max_length: Any) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if max_length is not None and not is_positive_int(max_length):
        raise DataError(f"max_length must be a positive number of tokens, got {max_length!r}")


def load_model_and_data(model_dir: str | Path, data: str | Path, task: str, *, max_length: int | None = None,
                        bf16: bool = False, truncate: bool = False):
    """(model, tokenizer, tokenised training data, label names, max_length) for `task`, data checked first.
    With `truncate`, rows longer than max_length are cut (see `tokenize_causal_lm`) instead of refused."""
    import torch

    _check_task_and_length(task, max_length)
    label_names = None
    num_labels = None
    if task == "classification":
        probe = tokenize_classification(read_rows(data), _NullTokenizer(), 10**9, str(data))
        label_names = probe.label_names
        num_labels = count_classes(probe, str(data))
    model, tokenizer = load_base(model_dir, task, num_labels, torch.bfloat16 if bf16 else torch.float32)
    if label_names:  # the classes by name in the model's config, which checkpoints and the adapter record
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: index for index, name in enumerate(label_names)}
    limit = _context_length(model, tokenizer)
    if max_length is not None and max_length > limit:
        raise DataError(f"--max-length {max_length} exceeds the model's context of {limit}")
    max_length = max_length or limit
    train_set = _tokenize(data, task, tokenizer, max_length, label_names, truncate)
    return model, tokenizer, train_set, label_names, max_length


@takes_numpy_scalars
def train(
    model_dir: str | Path,
    plan: Plan | dict[str, Any] | str | Path,
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

    `plan` is a Plan, its dict form (Plan.to_dict()) or the path of a plan JSON. Arguments, data and plan
    are checked before any training starts; numbers may be Python's or numpy scalars (np.int64, np.float32,
    np.bool_, ...). `out_dir` must not hold an earlier run's adapter or checkpoints unless `resume=True`,
    which continues the run whose checkpoints (adapter, optimizer, scheduler, RNG, run settings) are in
    out_dir/checkpoints, from the newest complete one (a checkpoint a kill cut short is skipped, and said
    so), and only if that run had this run's plan, base model, data
    and hyperparameters. `truncate=True` cuts rows longer than `max_length` (causal LM: their start,
    keeping the completion; see `tokenize_causal_lm`) instead of refusing them. The finished adapter is
    written to out_dir. Under torchrun or accelerate every process calls this and trains data parallel;
    only the main one writes (`TrainResult.main_process`).
    """
    arguments = dict(locals())  # as the caller gave them, before anything below binds or rebinds a name
    import torch
    from transformers import TrainingArguments, set_seed

    from .runs import check_out_folder, resume_point
    from .trainer import MoELoRATrainer

    _check_arguments(arguments)
    plan = _as_plan(plan)
    if gradient_checkpointing and plan.shortcuts:
        raise AdapterError("LoRA shortcut connections read activations across blocks, which gradient checkpointing "
                           "recomputes block by block; train this plan without --gradient-checkpointing")
    out = Path(out_dir)
    checkpoints = out / "checkpoints"
    check_out_folder(out, resume)
    last = resume_point(checkpoints) if resume else None
    set_seed(seed)  # a new task head (classification) is initialised while loading: same seed, same head
    model, tokenizer, train_set, label_names, max_length = load_model_and_data(
        model_dir, data, task, max_length=max_length, bf16=bf16, truncate=truncate)
    num_labels = model.config.num_labels if task == "classification" else None
    eval_set = _tokenize(eval_data, task, tokenizer, max_length, label_names, truncate, num_labels, EVAL_SPLITS) \
        if eval_data else None
    settings = _run_settings(plan, model, train_set.examples, arguments)  # the plan as given
    if task == "classification":
        heads = [h for h in CLASSIFIER_HEADS if hasattr(model, h)]
        plan = dataclasses.replace(plan, modules_to_save=sorted(set(plan.modules_to_save) | set(heads)))
    set_seed(seed)  # adapter initialisation is part of the run: the same seed, the same adapter
    inject_adapters(model, plan)  # raises AdapterError if the plan does not fit this model
    warn_if_plan_for_another_model(plan, model_dir, model)  # (it fits: a warning, not a contradiction)
    reallocation = _reallocation_callback(model, plan, train_set.examples, tokenizer.pad_token_id)
    if last is not None:
        _restore_run(last, settings, reallocation)

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
        write_run_record=_run_record_writer(settings, reallocation),
    )
    trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    rounds = reallocation.history if reallocation is not None else []
    main_process = trainer.is_world_process_zero()  # under torchrun / accelerate, one process writes
    if main_process:
        save_adapter(model, out, drop_disabled=True)  # (the classes' names: in the model's config since loading)
        tokenizer.save_pretrained(out)
        write_text_atomic(out / "trainer_log.json", json.dumps(
            {"log_history": trainer.state.log_history, "label_names": label_names, "reallocations": rounds},
            indent=2) + "\n")
    trainer.accelerator.wait_for_everyone()  # every process returns with the adapter on disk
    return TrainResult(out, trainer.state.log_history, label_names, rounds, main_process)


# The train() arguments that define a run: a checkpoint resumes only a run with the same values. The run's
# length (max_steps or epochs) is one where the learning-rate schedule depends on it (see _run_length).
RUN_DEFINING_ARGUMENTS = ("task", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size",
                          "gradient_accumulation_steps", "seed", "bf16")


def _run_settings(plan: Plan, model, examples: list[dict[str, Any]], arguments: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of its run: the plan (as given), the base model (name and config fingerprint),
    the tokenised training examples' hash, the hyperparameters among train()'s `arguments`, the processes."""
    from alphalora.adapters.io import base_fingerprint

    from .runs import examples_sha256, model_name, normalised

    recorded_plan = plan.to_dict()
    recorded_plan.pop("format_version")
    recorded_plan.pop("source", None)  # how the plan was made (HeteroLoRA's scores and timings), not what it trains
    return normalised({
        "base_model": model_name(arguments["model_dir"]),
        "base_fingerprint": base_fingerprint(model),
        "plan": recorded_plan,
        "train_examples_sha256": examples_sha256(examples),
        **{name: arguments[name] for name in RUN_DEFINING_ARGUMENTS},
        **_run_length(arguments),
        "processes": _world_size(),
    })


def _run_length(arguments: dict[str, Any]) -> dict[str, Any]:
    """max_steps or epochs (max_steps overrides epochs) where the learning-rate schedule is stretched over
    them; with a constant rate (no warmup) they only say where to stop, so a resumed run may go further."""
    scheduler, warmup = arguments["lr_scheduler"], arguments["warmup_ratio"]
    if scheduler == "constant" or (scheduler == "constant_with_warmup" and warmup == 0):
        return {"max_steps": None, "epochs": None}
    if arguments["max_steps"] != -1:
        return {"max_steps": arguments["max_steps"], "epochs": None}
    return {"max_steps": None, "epochs": arguments["epochs"]}


def _world_size() -> int:
    """Processes training data parallel (torchrun / accelerate set WORLD_SIZE): they multiply the batch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _run_record_writer(settings: dict[str, Any], reallocation):
    from .runs import write_run_record

    def write(folder: str) -> None:
        write_run_record(folder, settings, list(reallocation.history) if reallocation is not None else [])

    return write


def _restore_run(checkpoint: Path, settings: dict[str, Any], reallocation) -> None:
    """Refuses a checkpoint of another run (CheckpointError); gives dynamic HeteroLoRA back its earlier rounds."""
    from .runs import check_same_run, read_run_record

    rounds = check_same_run(checkpoint, read_run_record(checkpoint), settings)
    if reallocation is not None:
        reallocation.history = list(rounds)


def _as_plan(plan: Any) -> Plan:
    """A Plan from a Plan, its dict form or the path of its JSON file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise PlanFormatError(f"plan must be a Plan, a dict (Plan.to_dict()) or the path of a plan JSON, got "
                          f"{type(plan).__name__} {plan!r:.60}")


def _check_arguments(values: dict[str, Any]) -> None:
    """Refuses train() arguments of the wrong type or range before anything is loaded (transformers would fail
    on them later, with a traceback, or silently misread them)."""
    _check_task_and_length(values["task"], values["max_length"])
    _check_counts(values)
    _check_rates(values)
    _check_paths(values)
    seed = values["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an integer from 0 to 2**32 - 1, got {seed!r}")
    flags = ("bf16", "gradient_checkpointing", "resume", "progress", "truncate")
    for name in flags:
        if not isinstance(values[name], bool):
            raise DataError(f"{name} must be True or False, got {values[name]!r}")
    callbacks = values["callbacks"]
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise DataError(f"callbacks must be a list of transformers TrainerCallbacks, got {type(callbacks).__name__}")


def _check_counts(values: dict[str, Any]) -> None:
    for name in ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
        value = values[name]
        if not is_positive_int(value):
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    steps = values["max_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == -1 or steps >= 1):
        raise DataError(f"max_steps must be a positive number of steps, or -1 to train for `epochs`; got {steps!r}")


def _check_rates(values: dict[str, Any]) -> None:
    def finite(name: str) -> Any:
        value = values[name]
        if not is_number(value) or not math.isfinite(value):
            raise DataError(f"{name} must be a finite number, got {value!r}")
        return value

    if not finite("epochs") > 0:
        raise DataError(f"epochs must be positive, got {values['epochs']!r}")
    if not finite("learning_rate") >= 0:
        raise DataError(f"learning_rate must be >= 0, got {values['learning_rate']!r}")
    if not 0 <= finite("warmup_ratio") < 1 or not finite("weight_decay") >= 0:
        raise DataError(f"need 0 <= warmup_ratio < 1 and weight_decay >= 0, got {values['warmup_ratio']!r} and "
                        f"{values['weight_decay']!r}")
    if values["lr_scheduler"] not in LR_SCHEDULERS:
        raise DataError(f"unknown lr_scheduler {values['lr_scheduler']!r}; choose one of {', '.join(LR_SCHEDULERS)}")


def _check_paths(values: dict[str, Any]) -> None:
    for name in ("model_dir", "data", "out_dir", "eval_data"):
        value = values[name]
        if not isinstance(value, (str, os.PathLike)) and not (name == "eval_data" and value is None):
            raise DataError(f"{name} must be a path (str or pathlib.Path), got {type(value).__name__} {value!r:.60}")


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
