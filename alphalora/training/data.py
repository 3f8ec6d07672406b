"""Training data: JSONL or `datasets` folders -> tokenised examples, checked before training starts."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alphalora._io import first_line

TASKS = ("causal-lm", "classification")
# Alpaca's template, used when rows have instruction/input/output.
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


logger = logging.getLogger(__name__)
CLASSIFICATION_HINT = 'pass --task classification (task="classification" in Python)'


class DataError(ValueError):
    """Training data that cannot be used: the message names the file, the row and the fix."""


TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("validation", "test")  # evaluation data never falls back on a folder's train split
# The causal-LM row shapes, in the order they are tried: the fields each needs (null counts as absent).
CAUSAL_LM_SHAPES = (("prompt", "completion"), ("instruction", "output"), ("text",))


class JsonlRows(list):
    """A JSONL file's rows with the file line each was read from (blank lines are skipped, so row n is not
    always line n), for errors that point where an editor can jump to."""

    def __init__(self, rows: list[dict[str, Any]], lines: list[int]):
        super().__init__(rows)
        self.lines = lines


def row_place(rows: list[dict[str, Any]], index: int, source: str) -> str:
    """Where rows[index] is, for messages: `FILE:LINE` for a JSONL file, else `SOURCE row N` (1-based)."""
    if isinstance(rows, JsonlRows):
        return f"{source}:{rows.lines[index]}"
    return f"{source} row {index + 1}"


def read_rows(path: str | Path, splits: tuple[str, ...] = TRAIN_SPLITS) -> list[dict[str, Any]]:
    """Rows of a JSONL file, or of a `datasets` folder saved with save_to_disk: a Dataset, or the first of
    `splits` a DatasetDict has (training data: "train"; evaluation data: EVAL_SPLITS)."""
    source = Path(path)
    if not source.exists():
        raise DataError(f"data {source} does not exist")
    rows = _read_dataset_folder(source, splits) if source.is_dir() else _read_jsonl(source)
    if not rows:
        raise DataError(f"data {source} has no examples")
    return rows


def _read_jsonl(source: Path) -> JsonlRows:
    rows, lines = [], []
    # JSON Lines separates rows by "\n" alone: str.splitlines() would also split inside a string holding
    # U+2028, U+2029 or U+0085, which JSON leaves unescaped. A "\r" before the "\n" is JSON whitespace.
    for number, line in enumerate(_jsonl_text(source).split("\n"), start=1):
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
        lines.append(number)
    return JsonlRows(rows, lines)


def _jsonl_text(source: Path) -> str:
    """The file's text, read as UTF-8 (a leading byte order mark, which some Windows editors write, dropped)."""
    data = source.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{source}:{line} is not UTF-8 (byte {error.start}, 0x{data[error.start]:02x}: "
                        f"{error.reason}); save the file as UTF-8") from error
    return text.removeprefix("\ufeff")


def _read_dataset_folder(source: Path, splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows of a save_to_disk folder; an empty, truncated or corrupt one is a DataError, not a traceback."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(source))
    except FileNotFoundError as error:
        raise DataError(f"{source} is not a dataset saved with `save_to_disk`: {error}") from error
    except _UNREADABLE_DATASET_ERRORS as error:
        raise DataError(_unreadable_dataset(source, error)) from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_pick_split(source, list(loaded), splits)]
    try:
        return [dict(row) for row in loaded]
    except _UNREADABLE_DATASET_ERRORS as error:
        raise DataError(_unreadable_dataset(source, error)) from error


def _pick_split(source: Path, found: list[str], splits: tuple[str, ...]) -> str:
    chosen = next((name for name in splits if name in found), None)
    if chosen is None:
        wanted = " or ".join(repr(name) for name in splits)
        raise DataError(f"{source} has splits {found} but no {wanted} split; save the rows under {wanted} "
                        "(or save a single Dataset)")
    return chosen


def _arrow_errors() -> tuple[type[BaseException], ...]:
    try:
        import pyarrow
    except ImportError:
        return ()
    return (pyarrow.lib.ArrowException,)


# What datasets and pyarrow raise for a folder with no data files (IndexError), a truncated .arrow file
# (ArrowInvalid, a ValueError) or an unreadable state.json (a ValueError).
_UNREADABLE_DATASET_ERRORS = (IndexError, KeyError, OSError, ValueError, *_arrow_errors())


def _unreadable_dataset(source: Path, error: BaseException) -> str:
    problem = "it lists no data files" if isinstance(error, IndexError) else first_line(error)
    return (f"{source} is not a readable `datasets` folder ({problem}): it is empty, or a file in it is missing, "
            "truncated or corrupt; save the dataset again with `save_to_disk`")


def _given(row: dict[str, Any], field: str) -> bool:
    """Whether a row has a value for `field`: null (None, which datasets fills into missing columns) is absent."""
    return row.get(field) is not None


def _null_field_error(row: dict[str, Any], where: str) -> DataError:
    """The error for a row with no complete shape: names the null field of the shape it fills most."""
    named = [shape for shape in CAUSAL_LM_SHAPES if all(field in row for field in shape)]
    named.sort(key=lambda shape: -sum(_given(row, field) for field in shape))
    if named and any(_given(row, field) for field in named[0]):
        null = next(field for field in named[0] if not _given(row, field))
        return DataError(f"{where}: {null} is null; give it a value or remove the row")
    if named:
        nulls = [field for shape in named for field in shape]
        return DataError(f"{where}: {_listed(nulls)} {'is' if len(nulls) == 1 else 'are'} null; give the row "
                         "values or remove it")
    given = sorted(field for field in row if _given(row, field))
    labelled = f"; for classification data (text or sentence, with label), {CLASSIFICATION_HINT}" \
        if _given(row, "label") else ""
    return DataError(f"{where}: a causal-LM row needs prompt/completion, instruction/input/output or text (not "
                     f"null); got values for {given}{labelled}")


def warn_if_classification_rows(rows: list[dict[str, Any]], source: str) -> bool:
    """Logs one warning (and returns True) when most rows are classification rows (a text and a label): causal-LM
    training reads their text and drops the label, which is what a labelled corpus is for only sometimes (a
    language model adapted to its texts), so it is said, not refused."""
    labelled = sum(1 for row in rows if _given(row, "label") and _given(row, "text"))
    if labelled * 2 <= len(rows):
        return False
    logger.warning("%s: %d of %d rows have a label beside their text; causal-LM training (--task causal-lm, the "
                   "default) ignores labels and trains on the text alone; if this is classification data, %s", source,
                   labelled, len(rows), CLASSIFICATION_HINT)
    return True


def _listed(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _text(row: dict[str, Any], field: str, where: str) -> str:
    """A row's text field; any other JSON value is refused (str() of it would train on '5' or "['a']")."""
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} is {_json_kind(value)} ({value!r:.40}), not a string; write it as a "
                        "JSON string (in quotes)")
    return value


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "an object" if isinstance(value, dict) else f"a {type(value).__name__}"


def prompt_and_completion(row: dict[str, Any], where: str) -> tuple[str, str]:
    """The (prompt, completion) of a causal-LM row in any of the accepted shapes (null fields count as absent)."""
    if _given(row, "prompt") and _given(row, "completion"):
        return _text(row, "prompt", where), _text(row, "completion", where)
    if _given(row, "instruction") and _given(row, "output"):
        extra = _text(row, "input", where) if _given(row, "input") else ""
        prompt = INSTRUCTION_TEMPLATE.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=_text(row, "instruction", where),
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return prompt, _text(row, "output", where)
    if _given(row, "text"):
        return "", _text(row, "text", where)
    raise _null_field_error(row, where)


@dataclass
class TokenizedData:
    examples: list[dict[str, list[int]]]
    label_names: list[str] | None = None


TRUNCATE_HINT = "pass --truncate (truncate=True in Python) to cut long rows to that length"


def tokenize_causal_lm(rows, tokenizer, max_length: int, source: str, truncate: bool = False) -> TokenizedData:
    """Prompt tokens are masked out of the loss (-100); the completion ends with EOS.

    A row longer than `max_length` is an error, or with `truncate` loses tokens from its start: the
    leading BOS token is kept and then the last max_length - 1 tokens, so the completion and its EOS
    (the tokens the loss is on) survive and the prompt's beginning is cut first. A cut that leaves a row
    nothing to train on (max_length 1) is an error, not a row that adds nothing to the loss."""
    examples, emptied = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for index, row in enumerate(rows):
        where = row_place(rows, index, source)
        prompt, completion = prompt_and_completion(row, where)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else (
            [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
        ids = prompt_ids + completion_ids
        labels = [-100] * len(prompt_ids) + completion_ids
        if len(ids) > max_length:
            if not truncate:
                raise DataError(f"{where} is {len(ids)} tokens, longer than the {max_length} allowed "
                                f"(--max-length, default: the model's context); shorten it, or {TRUNCATE_HINT}")
            trained_before = _trains_on_a_token(labels)
            ids, labels = keep_end(ids, labels, max_length, tokenizer.bos_token_id)
            if trained_before and not _trains_on_a_token(labels):
                emptied.append(index)
        examples.append({"input_ids": ids, "labels": labels})
    if emptied:
        raise DataError(f"{source}: --max-length {max_length} with --truncate leaves {len(emptied)} of "
                        f"{len(examples)} rows ({_listed_rows(rows, emptied)}) no completion token to train on (a "
                        "sequence's first token is never predicted); pass a larger --max-length")
    return TokenizedData(examples)


def _trains_on_a_token(labels: list[int]) -> bool:
    """Whether a causal-LM example has a token in the loss: a label other than -100 after the first token (a
    causal LM predicts token i from the tokens before it, so the first token's label is never used)."""
    return any(label != -100 for label in labels[1:])


def _listed_rows(rows: list[dict[str, Any]], indices: list[int], shown: int = 5) -> str:
    """'row 3', 'rows 1, 2 and 4', 'rows 1, 2, 3, 4, 5 and 7 more'; 'line 3', 'lines ...' for a JSONL file."""
    noun, numbers = ("line", [rows.lines[i] for i in indices]) if isinstance(rows, JsonlRows) else (
        "row", [i + 1 for i in indices])
    if len(numbers) <= shown:
        return f"{noun}{'s' if len(numbers) > 1 else ''} {_listed([str(n) for n in numbers])}"
    return f"{noun}s {', '.join(str(n) for n in numbers[:shown])} and {len(numbers) - shown} more"


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
    labels = [r["label"] for r in rows if _given(r, "label")]
    for index, row in enumerate(rows):
        if isinstance(row.get("label"), bool):  # (JSON true is no class index: torch would train it multi-label)
            raise DataError(f"{row_place(rows, index, source)}: label {row['label']!r} is a boolean; give each class "
                            "an index (0, 1) or a name (\"yes\", \"no\")")
    if len({isinstance(label, int) for label in labels}) > 1:
        raise DataError(f"{source} mixes class indices and class names as labels; use one or the other")
    names = label_names or _ordered_names({str(label) for label in labels if not isinstance(label, int)}) or None
    examples = []
    for index, row in enumerate(rows):
        where = row_place(rows, index, source)
        text, label = _classification_fields(row, where)
        if not isinstance(label, int):
            if names is None or str(label) not in names:
                raise DataError(f"{where}: label {label!r} is not one of {names}")
            label = names.index(str(label))
        elif label < 0:
            raise DataError(f"{where}: label {label} is negative; labels are class indices 0, 1, ... "
                            "or class names")
        cut = {"truncation": True, "max_length": max_length} if truncate else {}
        ids = tokenizer(text, add_special_tokens=True, **cut)["input_ids"]
        if len(ids) > max_length:
            raise DataError(f"{where} is {len(ids)} tokens, longer than the {max_length} allowed "
                            f"(--max-length, default: the model's context); shorten it, or {TRUNCATE_HINT}")
        examples.append({"input_ids": ids, "labels": label})
    return TokenizedData(examples, names)


_INTEGER_NAME = re.compile(r"[+-]?[0-9]+")
_INDEX_NAME = re.compile(r"0|[1-9][0-9]*")


def _ordered_names(names: set[str]) -> list[str]:
    """Class names in index order. Names that are all class indices written out ("0", "1", ... "11") are their own
    indices, as the same labels given as numbers are: "1", "2", "3" are classes 1 to 3 of "0" .. "3" (an eval file
    that gives them as numbers means the same classes). Other integers ("-1", "+1", "01") are sorted numerically;
    any other names as strings."""
    if names and all(_INDEX_NAME.fullmatch(name) for name in names):
        return [str(index) for index in range(1 + max(int(name) for name in names))]
    if names and all(_INTEGER_NAME.fullmatch(name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _classification_fields(row: dict[str, Any], where: str) -> tuple[str, Any]:
    """(text, label) of a classification row (text from `text`, else `sentence`); null counts as absent."""
    text_field = "text" if _given(row, "text") else "sentence"
    text, label = row.get(text_field), row.get("label")
    if text is not None and label is not None:
        return _text(row, text_field, where), label
    missing = [name for name, value in (("text", text), ("label", label)) if value is None]
    null = [name for name in missing if name in row or (name == "text" and "sentence" in row)]
    if null == missing:
        raise DataError(f"{where}: {_listed(null)} {'is' if len(null) == 1 else 'are'} null; give the row "
                        "values or remove it")
    raise DataError(f"{where}: a classification row needs text and label; got {sorted(row)}")


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
