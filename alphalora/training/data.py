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


TRUNCATE_HINT = "pass --truncate (truncate=True in Python) to cut long rows to that length"


def tokenize_causal_lm(rows, tokenizer, max_length: int, source: str, truncate: bool = False) -> TokenizedData:
    """Prompt tokens are masked out of the loss (-100); the completion ends with EOS.

    A row longer than `max_length` is an error, or with `truncate` loses tokens from its start: the
    leading BOS token is kept and then the last max_length - 1 tokens, so the completion and its EOS
    (the tokens the loss is on) survive and the prompt's beginning is cut first."""
    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for number, row in enumerate(rows, start=1):
        prompt, completion = prompt_and_completion(row, f"{source} row {number}")
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids
        if len(ids) > max_length:
            if not truncate:
                raise DataError(f"{source} row {number} is {len(ids)} tokens, longer than the {max_length} allowed "
                                f"(--max-length, default: the model's context); shorten it, or {TRUNCATE_HINT}")
            ids, labels = keep_end(ids, labels, max_length, tokenizer.bos_token_id)
        examples.append({"input_ids": ids, "labels": labels})
    return TokenizedData(examples)


def keep_end(ids: list[int], labels: list[int], max_length: int, bos: int | None) -> tuple[list[int], list[int]]:
    """The last max_length tokens of a row (and their labels), behind its BOS token when it starts with one."""
    head = 1 if bos is not None and ids[:1] == [bos] and max_length > 1 else 0
    tail = max_length - head
    return ids[:head] + ids[len(ids) - tail:], labels[:head] + labels[len(labels) - tail:]


def tokenize_classification(rows, tokenizer, max_length: int, source: str,
                            label_names: list[str] | None = None, truncate: bool = False) -> TokenizedData:
    """Rows with `text` (or `sentence`) and `label`: a class index (0, 1, ...) or a class name.

    A text longer than `max_length` is an error, or with `truncate` is cut by the tokenizer (its
    truncation side, normally the end; special tokens such as [CLS] and [SEP] are kept)."""
    indices = {isinstance(r.get("label"), int) for r in rows if "label" in r}
    if len(indices) > 1:
        raise DataError(f"{source} mixes class indices and class names as labels; use one or the other")
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
        elif label < 0:
            raise DataError(f"{source} row {number}: label {label} is negative; labels are class indices 0, 1, ... "
                            "or class names")
        cut = {"truncation": True, "max_length": max_length} if truncate else {}
        ids = tokenizer(str(text), add_special_tokens=True, **cut)["input_ids"]
        if len(ids) > max_length:
            raise DataError(f"{source} row {number} is {len(ids)} tokens, longer than the {max_length} allowed "
                            f"(--max-length, default: the model's context); shorten it, or {TRUNCATE_HINT}")
        examples.append({"input_ids": ids, "labels": label})
    return TokenizedData(examples, names)


def count_classes(data: TokenizedData, source: str) -> int:
    """The classes a classification data set defines (names, or 1 + the largest index); at least 2."""
    if data.label_names:
        classes, found = len(data.label_names), data.label_names
    else:
        classes = 1 + max(e["labels"] for e in data.examples)
        found = sorted({e["labels"] for e in data.examples})
    if classes < 2:
        raise DataError(f"{source} has labels {found}: classification needs at least 2 classes (a single class "
                        "would train a regression head); check the label column")
    return classes


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
