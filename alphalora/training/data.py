"""Training data: JSONL or `datasets` folders -> tokenised examples, checked before training starts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TASKS = ("causal-lm", "classification")
# Alpaca's template, used when rows have instruction/input/output.
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class DataError(ValueError):
    """Training data that cannot be used: the message names the file, the row and the fix."""


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, or the train split of a `datasets` folder saved with save_to_disk."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"data {source} does not exist")
    if source.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(source))
        except FileNotFoundError as error:
            raise DataError(f"{source} is not a dataset saved with `save_to_disk`: {error}") from error
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{source} has splits {list(loaded)} but no 'train' split")
            loaded = loaded["train"]
        rows = [dict(row) for row in loaded]
    else:
        rows = []
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{source}:{number} is not valid JSON ({error.msg}); each line must be one object"
                ) from error
            if not isinstance(row, dict):
                raise DataError(f"{source}:{number} is not a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"data {source} has no examples")
    return rows


def prompt_and_completion(row: dict[str, Any], where: str) -> tuple[str, str]:
    """The (prompt, completion) of a causal-LM row in any of the accepted shapes."""
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    if "instruction" in row and "output" in row:
        extra = str(row.get("input") or "")
        prompt = INSTRUCTION_TEMPLATE.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, str(row["output"])
    if "text" in row:
        return "", str(row["text"])
    raise DataError(f"{where}: a causal-LM row needs prompt/completion, instruction/input/output or text; "
                    f"got keys {sorted(row)}")


@dataclass
class TokenizedData:
    examples: list[dict[str, list[int]]]
    label_names: list[str] | None = None


def tokenize_causal_lm(rows, tokenizer, max_length: int, source: str) -> TokenizedData:
    """Prompt tokens are masked out of the loss (-100); the completion ends with EOS."""
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for number, row in enumerate(rows, start=1):
        prompt, completion = prompt_and_completion(row, f"{source} row {number}")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        ids = prompt_ids + completion_ids
        if len(ids) > max_length:
            raise DataError(f"{source} row {number} is {len(ids)} tokens, longer than the model's context of "
                            f"{max_length}; shorten it or pass a smaller --max-length with --truncate")
        examples.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + completion_ids})
    return TokenizedData(examples)


def tokenize_classification(rows, tokenizer, max_length: int, source: str,
                            label_names: list[str] | None = None) -> TokenizedData:
    """Rows with `text` (or `sentence`) and `label` (an index or a name)."""
    names = label_names or sorted({str(r.get("label")) for r in rows if not isinstance(r.get("label"), int)}) or None
    examples = []
    for number, row in enumerate(rows, start=1):
        text = row.get("text", row.get("sentence"))
        if text is None or "label" not in row:
            raise DataError(f"{source} row {number}: a classification row needs text and label; got {sorted(row)}")
        label = row["label"]
        if not isinstance(label, int):
            if names is None or str(label) not in names:
                raise DataError(f"{source} row {number}: label {label!r} is not one of {names}")
            label = names.index(str(label))
        ids = tokenizer(str(text), add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            raise DataError(f"{source} row {number} is {len(ids)} tokens, longer than the model's context of "
                            f"{max_length}; shorten it or pass --truncate")
        examples.append({"input_ids": ids, "labels": label})
    return TokenizedData(examples, names)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def collate(pad_id: int):
    """Pads a batch to its longest example: pad_id for inputs, -100 for token labels."""
    def collate_batch(batch):
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        token_labels = isinstance(batch[0]["labels"], list)
        labels = torch.full((len(batch), width), -100, dtype=torch.long) if token_labels else torch.tensor(
            [e["labels"] for e in batch])
        for b, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[b, :n] = torch.tensor(e["input_ids"])
            mask[b, :n] = 1
            if token_labels:
                labels[b, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate_batch
