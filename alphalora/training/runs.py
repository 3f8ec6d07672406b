"""One run per output folder: an earlier run's folder is not trained over, and `resume` continues only the
run its checkpoint recorded (same plan, base model, data and hyperparameters)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from alphalora._io import first_line, write_text_atomic
from alphalora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, architecture_differences

from .trainer import CheckpointError, checkpoint_paths, last_complete_checkpoint

RUN_RECORD_NAME = "alphalora_run.json"  # in each checkpoint: the run's settings and dynamic HeteroLoRA rounds
RUN_RECORD_VERSION = 1
RESUME_HINT = "pass --resume (resume=True in Python) to continue that run"


def check_out_folder(out: Path, resume: bool) -> None:
    """Refuses, before anything is loaded, an output folder that is a file, one that holds an earlier run's
    adapter or checkpoints (unless resuming), and one holding a finished adapter but nothing to resume from."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder (new or empty) for the adapter")
    adapter = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (out / name).exists()]
    checkpoints = [path.name for path in checkpoint_paths(out / "checkpoints")]
    if not resume and (adapter or checkpoints):
        held = " and ".join(part for part in (
            f"an adapter ({', '.join(adapter)})" if adapter else "",
            f"checkpoints ({', '.join(checkpoints[:3])}{', ...' if len(checkpoints) > 3 else ''})"
            if checkpoints else "") if part)
        resumable = checkpoints and last_complete_checkpoint(out / "checkpoints")[0] is not None
        hint = f"{RESUME_HINT}, or " if resumable else "none of its checkpoints is complete enough to resume; "
        raise CheckpointError(f"{out} already holds {held} of an earlier run; {hint}choose another --out (or "
                              f"delete {out}) to start a new one")
    if resume and adapter and not checkpoints:
        raise CheckpointError(f"{out} holds a finished adapter but no checkpoints to resume from; choose another "
                              f"--out (or delete {out}) to train again")


def resume_point(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint (None: none yet, start afresh); says which, and what it skipped."""
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
                              f"{checkpoints} (or choose another --out) to start from the beginning")
    if last is None:
        print(f"no checkpoint in {checkpoints}: starting from the beginning")
    else:
        print(f"resuming from {last}")
    return last


def examples_sha256(examples: list[dict[str, Any]]) -> str:
    """A hash of tokenised examples: the data a run trains on, after --max-length and --truncate."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def model_name(model_dir: str | Path) -> str:
    """The base model as a run records it: a Hub id as given, a folder as its absolute path."""
    from alphalora.model_source import is_hub_id

    return str(model_dir) if is_hub_id(model_dir) else str(Path(model_dir).expanduser().resolve())


def normalised(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples as lists), so that recorded and current ones compare."""
    return json.loads(json.dumps(settings))


def write_run_record(folder: str | Path, settings: dict[str, Any], reallocations: list[dict[str, Any]]) -> None:
    record = {"format_version": RUN_RECORD_VERSION, "settings": settings, "reallocations": reallocations}
    write_text_atomic(Path(folder) / RUN_RECORD_NAME, json.dumps(record, indent=2) + "\n")


def read_run_record(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint's run record; None for a checkpoint written before checkpoints recorded their run."""
    path = checkpoint / RUN_RECORD_NAME
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} cannot be read ({first_line(error)}); delete {checkpoint} to resume from "
                              "the checkpoint before it") from error
    if not isinstance(record, dict) or record.get("format_version") != RUN_RECORD_VERSION \
            or not isinstance(record.get("settings"), dict) or not isinstance(record.get("reallocations"), list):
        raise CheckpointError(f"{path} is not a run record this version of alphalora writes; resume with the "
                              f"version that wrote it, or delete {checkpoint}")
    return record


def check_same_run(checkpoint: Path, record: dict[str, Any] | None, settings: dict[str, Any]) -> list[dict]:
    """The checkpoint's dynamic HeteroLoRA rounds, once its recorded settings are this run's (CheckpointError
    naming the settings that differ otherwise). A checkpoint from before run records resumes unchecked."""
    if record is None:
        print(f"{checkpoint.name} does not record its run's settings (written by an older alphalora): resuming "
              "without checking that this run's plan, model, data and hyperparameters are the same")
        return []
    # The base model is compared by its config's fingerprint: the same model may sit at another path now.
    recorded, current = ({k: v for k, v in s.items() if k != "base_model"} for s in (record["settings"],
                                                                                    normalised(settings)))
    differences = architecture_differences(recorded, current, limit=8)
    if differences:
        raise CheckpointError(
            f"{checkpoint} belongs to a run with other settings (checkpoint -> this run: {'; '.join(differences)}); "
            f"resume with that run's settings, or train this one into another --out (or delete "
            f"{checkpoint.parent.parent}) to start it afresh")
    return record["reallocations"]
