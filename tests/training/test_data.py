"""Training data checks: JSONL is UTF-8 JSON Lines (a byte order mark allowed), text fields are strings, --truncate
cuts long rows the documented way and never to nothing; classification labels are class indices or names (integer
names in numeric order), with at least two classes."""

from __future__ import annotations

import json

import pytest

from alphalora.training import DataError, train
from alphalora.training.data import tokenize_causal_lm, tokenize_classification
from tests.tiny_models import save_tiny, tiny_tokenizer


def _ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def test_truncate_keeps_bos_and_the_end_of_a_causal_lm_row():
    """By hand from the vocabulary: a text row is BOS, its words, EOS; cut to 4 it keeps BOS and the last three
    (the end of the text and EOS). A prompt/completion row (this tokenizer adds no BOS) keeps its last 4 tokens,
    the completion whole and the prompt's end, still masked."""
    tok = tiny_tokenizer("llama")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    text = {"text": "one two three four five"}
    chat = {"prompt": "the cat sat on", "completion": "the mat"}
    assert tokenize_causal_lm([text], tok, 7, "d")  # 7 tokens fit without cutting
    got = tokenize_causal_lm([text, chat], tok, 4, "d", truncate=True).examples
    assert got[0] == {"input_ids": [bos, *_ids(tok, "four five"), eos], "labels": [-100, *_ids(tok, "four five"), eos]}
    assert got[1] == {"input_ids": [*_ids(tok, "on the mat"), eos], "labels": [-100, *_ids(tok, "the mat"), eos]}
    with pytest.raises(DataError, match=r"d row 1 is 7 tokens, longer than the 4 allowed .*pass --truncate"):
        tokenize_causal_lm([text], tok, 4, "d")


def test_truncate_keeps_the_start_of_a_classification_text():
    tok = tiny_tokenizer("bert")
    rows = [{"text": "the cat sat on the mat", "label": 0}, {"text": "red green", "label": 1}]
    got = tokenize_classification(rows, tok, 3, "d", truncate=True).examples
    assert got == [{"input_ids": _ids(tok, "the cat sat"), "labels": 0}, {"input_ids": _ids(tok, "red green"),
                                                                           "labels": 1}]
    with pytest.raises(DataError, match="pass --truncate"):
        tokenize_classification(rows, tok, 3, "d")


def test_truncate_trains_from_python_and_the_command_line(tmp_path, capsys):
    from alphalora.allocation import Plan
    from alphalora.cli import main

    model_dir = save_tiny("llama", tmp_path / "model")
    rows = [{"prompt": "one two three four five " * 3, "completion": "the cat sat on the mat"}] * 4
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[2, 2], top_k_per_layer=[1, 1],
                target_modules=["q"], rank=2)
    with pytest.raises(DataError, match="pass --truncate"):
        train(model_dir, plan, data, tmp_path / "a", max_length=12)
    result = train(model_dir, plan, data, tmp_path / "a", max_length=12, truncate=True, max_steps=1, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    plan.save(tmp_path / "plan.json")
    args = ["train", "--model", str(model_dir), "--plan", str(tmp_path / "plan.json"), "--data", str(data),
            "--out", str(tmp_path / "b"), "--max-length", "12", "--max-steps", "1", "--no-progress"]
    assert main(args) == 2
    assert "pass --truncate" in capsys.readouterr().err
    assert main([*args, "--truncate"]) == 0
    assert "Loading weights" not in capsys.readouterr().err  # --no-progress quiets transformers' bars too


@pytest.mark.parametrize("labels, message", [
    ([0, -1], "d.jsonl:2: label -1 is negative"),
    ([0, 0], r"has labels \[0\]: classification needs at least 2 classes"),
    (["spam", "spam"], r"has labels \['spam'\]: classification needs at least 2 classes"),
    ([0, "spam"], "mixes class indices and class names"),
])
def test_labels_that_would_not_train_a_classifier_are_refused(labels, message, tmp_path):
    """{0, -1} used to give num_labels = 1, and so a regression head trained in silence."""
    from alphalora.allocation import Plan

    model_dir = save_tiny("bert", tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sat", "label": label}) for label in labels))
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q"], rank=2)
    with pytest.raises(DataError, match=message):
        train(model_dir, plan, data, tmp_path / "a", task="classification", max_steps=1, progress=False)
    assert not (tmp_path / "a").exists()


def test_evaluation_labels_beyond_the_training_classes_are_refused(tmp_path):
    from alphalora.allocation import Plan

    model_dir = save_tiny("bert", tmp_path / "model")
    data, eval_data = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sat", "label": n}) for n in (0, 1)))
    eval_data.write_text(json.dumps({"text": "red green", "label": 2}))
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q"], rank=2)
    with pytest.raises(DataError, match=r"e.jsonl has labels \[2\], but the training data defines 2 classes"):
        train(model_dir, plan, data, tmp_path / "a", task="classification", eval_data=eval_data, progress=False)


def test_null_fields_count_as_absent_so_mixed_rows_keep_their_shapes(tmp_path):
    """datasets.load_dataset("json") over rows of mixed shapes gives every row every column, null where its shape
    lacks it: each row must still train on its own fields, exactly as the JSONL rows do (it used to take the
    prompt/completion branch and train on the text 'None')."""
    import datasets

    from alphalora.training.data import read_rows

    tok = tiny_tokenizer("llama")
    rows = [{"prompt": "the cat sat on", "completion": "the mat"}, {"text": "red green blue yellow"},
            {"instruction": "count", "input": "one two", "output": "three four five"}]
    columns = sorted({key for row in rows for key in row})
    filled = [{key: row.get(key) for key in columns} for row in rows]
    datasets.Dataset.from_list(filled).save_to_disk(str(tmp_path / "mixed"))
    from_folder = tokenize_causal_lm(read_rows(tmp_path / "mixed"), tok, 64, "d").examples
    assert from_folder == tokenize_causal_lm(rows, tok, 64, "d").examples
    assert from_folder[1] == {"input_ids": [tok.bos_token_id, *_ids(tok, "red green blue yellow"), tok.eos_token_id],
                              "labels": [-100, *_ids(tok, "red green blue yellow"), tok.eos_token_id]}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "the cat", "completion": None}, "d row 2: completion is null"),
    ({"text": None}, "d row 2: text is null"),
    ({"instruction": None, "output": "the mat"}, "d row 2: instruction is null"),
    ({"prompt": None, "completion": None, "text": None}, "d row 2: prompt, completion and text are null"),
])
def test_a_causal_lm_row_whose_needed_field_is_null_is_refused(row, message):
    tok = tiny_tokenizer("llama")
    with pytest.raises(DataError, match=message):
        tokenize_causal_lm([{"text": "the cat"}, row], tok, 64, "d")


def test_classification_nulls_count_as_absent():
    tok = tiny_tokenizer("bert")
    rows = [{"text": None, "sentence": "the cat sat", "label": "animal"},
            {"text": "red green", "sentence": None, "label": "colour"}]
    got = tokenize_classification(rows, tok, 64, "d")
    assert got.label_names == ["animal", "colour"]  # no class named 'None'
    assert got.examples == [{"input_ids": _ids(tok, "the cat sat"), "labels": 0},
                            {"input_ids": _ids(tok, "red green"), "labels": 1}]
    with pytest.raises(DataError, match="d row 2: label is null"):
        tokenize_classification([rows[0], {"text": "red green", "label": None}], tok, 64, "d")
    with pytest.raises(DataError, match="d row 1: text is null"):
        tokenize_classification([{"text": None, "label": 0}, {"text": "red", "label": 1}], tok, 64, "d")


def _saved_splits(folder, **splits):
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(folder))
    return folder


def test_evaluation_data_reads_the_validation_split_then_test_never_train(tmp_path):
    from alphalora.training.data import EVAL_SPLITS, read_rows

    train_rows, validation_rows, test_rows = [{"text": "a"}], [{"text": "b"}], [{"text": "c"}]
    every = _saved_splits(tmp_path / "every", train=train_rows, validation=validation_rows, test=test_rows)
    assert read_rows(every, EVAL_SPLITS) == validation_rows
    assert read_rows(every) == train_rows  # training data keeps the train split
    assert read_rows(_saved_splits(tmp_path / "no_validation", train=train_rows, test=test_rows),
                     EVAL_SPLITS) == test_rows
    with pytest.raises(DataError, match=r"has splits \['train'\] but no 'validation' or 'test' split"):
        read_rows(_saved_splits(tmp_path / "train_only", train=train_rows), EVAL_SPLITS)


def test_evaluation_on_a_dataset_dict_uses_its_validation_split(tmp_path):
    """End to end: the eval folder's train split holds rows no causal-LM reader accepts, so the run only
    succeeds (and logs an eval loss) if it evaluates on the validation split."""
    from alphalora.allocation import Plan

    model_dir = save_tiny("llama", tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sat on the mat"}) for _ in range(4)))
    evaluation = _saved_splits(tmp_path / "eval", train=[{"question": "not a causal-LM row"}],
                               validation=[{"text": "red green blue"}] * 2)
    plan = Plan(method="uniform", base_model=str(model_dir), experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q"], rank=2)
    result = train(model_dir, plan, data, tmp_path / "a", eval_data=evaluation, epochs=1, batch_size=4,
                   progress=False)
    assert [h["epoch"] for h in result.log_history if "eval_loss" in h] == [1.0]


def test_an_empty_or_corrupt_datasets_folder_is_a_clear_error(tmp_path):
    import datasets

    from alphalora.training.data import read_rows

    datasets.Dataset.from_list([{"text": "the cat sat"}] * 20).save_to_disk(str(tmp_path / "corrupt"))
    (arrow,) = (tmp_path / "corrupt").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])  # cut short, as by a full disk or an interrupted copy
    datasets.Dataset.from_list([{"text": "the cat sat"}]).save_to_disk(str(tmp_path / "empty"))
    state = json.loads((tmp_path / "empty" / "state.json").read_text())
    for data_file in state["_data_files"]:
        (tmp_path / "empty" / data_file["filename"]).unlink()
    state["_data_files"] = []
    (tmp_path / "empty" / "state.json").write_text(json.dumps(state))
    for name, problem in [("corrupt", "Expected to read"), ("empty", "it lists no data files")]:
        with pytest.raises(DataError, match=f"{name} is not a readable `datasets` folder \\({problem}.*save the "
                                            "dataset again with `save_to_disk`"):
            read_rows(tmp_path / name)


def _write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def test_a_file_that_is_not_utf8_is_a_data_error_naming_the_line_byte_and_fix(tmp_path):
    """A Latin-1 'café' used to escape as a raw UnicodeDecodeError traceback."""
    from alphalora.training.data import read_rows

    data = b'{"text": "the cat"}\n{"text": "caf\xe9"}\n'
    path = _write_bytes(tmp_path / "latin1.jsonl", data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin1.jsonl:2 is not UTF-8 \(byte {offset}, 0xe9: .*\); save the file as "
                                        "UTF-8"):
        read_rows(path)


def test_rows_split_on_newlines_alone(tmp_path):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped inside strings; str.splitlines() cut rows there."""
    from alphalora.training.data import read_rows

    tok = tiny_tokenizer("llama")
    rows = [{"prompt": "the cat\u2028sat on", "completion": "the\u2029mat"}, {"text": "red\x85green blue"}]
    path = _write_bytes(tmp_path / "d.jsonl", "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode())
    assert read_rows(path) == rows
    spaced = [{"prompt": "the cat sat on", "completion": "the mat"}, {"text": "red green blue"}]
    assert tokenize_causal_lm(read_rows(path), tok, 64, "d").examples == \
        tokenize_causal_lm(spaced, tok, 64, "d").examples  # the tokenizer splits words at those separators too


def test_a_byte_order_mark_and_crlf_line_ends_read_as_the_plain_file(tmp_path):
    """Windows editors save UTF-8 with a byte order mark, which used to fail as invalid JSON on line 1."""
    from alphalora.training.data import read_rows

    tok = tiny_tokenizer("llama")
    lines = [json.dumps({"prompt": "the cat sat on", "completion": "the mat"}), json.dumps({"text": "red green"})]
    plain = _write_bytes(tmp_path / "plain.jsonl", "\n".join(lines).encode())
    windows = _write_bytes(tmp_path / "windows.jsonl", b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert read_rows(windows) == read_rows(plain)
    assert tokenize_causal_lm(read_rows(windows), tok, 64, "d").examples == \
        tokenize_causal_lm(read_rows(plain), tok, 64, "d").examples


@pytest.mark.parametrize("row, message", [
    ({"prompt": 5, "completion": "the mat"}, r"d row 2: prompt is a number \(5\), not a string"),
    ({"prompt": "the cat", "completion": ["the mat"]}, r"d row 2: completion is a list \(\['the mat'\]\), not a"),
    ({"instruction": "count", "input": {"n": 2}, "output": "three"}, r"d row 2: input is an object \(\{'n': 2\}\)"),
    ({"instruction": "count", "input": 0, "output": "three"}, r"d row 2: input is a number \(0\)"),
    ({"instruction": 7, "output": "three"}, "d row 2: instruction is a number"),
    ({"text": True}, r"d row 2: text is a boolean \(True\), not a string; write it as a JSON string \(in quotes\)"),
])
def test_a_causal_lm_text_field_that_is_not_a_string_is_refused(row, message):
    """These used to train on str() of the value: '5', "['the mat']", 'True'."""
    tok = tiny_tokenizer("llama")
    with pytest.raises(DataError, match=message):
        tokenize_causal_lm([{"text": "the cat"}, row], tok, 64, "d")


def test_a_classification_text_that_is_not_a_string_is_refused(tmp_path):
    tok = tiny_tokenizer("bert")
    with pytest.raises(DataError, match=r"d row 2: sentence is a list \(\['red'\]\), not a string"):
        tokenize_classification([{"text": "the cat", "label": 0}, {"sentence": ["red"], "label": 1}], tok, 64, "d")
    from alphalora.allocation import Plan

    model_dir = save_tiny("bert", tmp_path / "model")
    data = tmp_path / "numbers.jsonl"
    data.write_text("\n".join(json.dumps({"text": text, "label": n % 2}) for n, text in enumerate(["the cat", 12])))
    plan = Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q"], rank=2)
    with pytest.raises(DataError, match=r"numbers.jsonl:2: text is a number \(12\), not a string"):
        train(model_dir, plan, data, tmp_path / "a", task="classification", max_steps=1, progress=False)


def test_truncation_that_leaves_no_completion_token_is_refused():
    """Cut to one token a row keeps only its EOS, which a causal LM never predicts (nothing before it): the run
    trained on nothing, with a train loss of 0. Two tokens keep BOS and EOS, and EOS is trained."""
    tok = tiny_tokenizer("llama")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = [{"text": "one two three"}, {"prompt": "the cat sat", "completion": "on"}, {"text": "red"}]
    with pytest.raises(DataError, match=r"d: --max-length 1 with --truncate leaves 3 of 3 rows \(rows 1, 2 and 3\) no "
                                        r"completion token to train on .*; pass a larger --max-length"):
        tokenize_causal_lm(rows, tok, 1, "d", truncate=True)
    assert tokenize_causal_lm(rows[:1], tok, 2, "d", truncate=True).examples == [
        {"input_ids": [bos, eos], "labels": [-100, eos]}]


def test_integer_class_names_are_ordered_numerically():
    """Labels "0" .. "11" used to be indexed in string order ("10" before "2"), so row label "2" trained class 3."""
    tok = tiny_tokenizer("bert")
    rows = [{"text": "the cat", "label": str(n)} for n in (11, 2, 0, 10, 1, 3, 4, 5, 6, 7, 8, 9)]
    got = tokenize_classification(rows, tok, 64, "d")
    assert got.label_names == [str(n) for n in range(12)]
    assert [e["labels"] for e in got.examples] == [int(r["label"]) for r in rows]
    words = tokenize_classification([{"text": "a", "label": name} for name in ("b", "10", "a", "2")], tok, 64, "d")
    assert words.label_names == ["10", "2", "a", "b"]  # not all integers: string order, as before


def test_class_names_that_are_indices_mean_what_the_same_numbers_mean():
    """Oracle: the same labels given as JSON numbers. Names "1", "2", "3" were indexed 0, 1, 2, so an eval file
    giving the classes as numbers scored label 1 against class "2" (accuracy 0 for a perfect model) and numbers
    1, 2, 3 trained a 4-class head where names trained a 3-class one. Signed or zero-padded integers are names."""
    from alphalora.training.data import count_classes

    tok = tiny_tokenizer("bert")
    named = tokenize_classification([{"text": "a", "label": str(n)} for n in (3, 1, 2)], tok, 64, "d")
    numbered = tokenize_classification([{"text": "a", "label": n} for n in (3, 1, 2)], tok, 64, "d")
    assert [e["labels"] for e in named.examples] == [e["labels"] for e in numbered.examples] == [3, 1, 2]
    assert count_classes(named, "d") == count_classes(numbered, "d") == 4
    eval_numbers = tokenize_classification([{"text": "a", "label": 2}], tok, 64, "e", label_names=named.label_names)
    eval_names = tokenize_classification([{"text": "a", "label": "2"}], tok, 64, "e", label_names=named.label_names)
    assert eval_numbers.examples[0]["labels"] == eval_names.examples[0]["labels"] == 2
    signed = tokenize_classification([{"text": "a", "label": n} for n in ("1", "-1", "01")], tok, 64, "d")
    assert signed.label_names == ["-1", "01", "1"]


def test_boolean_labels_are_refused_naming_the_row():
    """JSON true/false passed as class indices (bool is an int in Python) and trained a multi-label head, which
    failed mid-run with a shape error and left a checkpoints folder behind."""
    tok = tiny_tokenizer("bert")
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": True}]
    with pytest.raises(DataError, match=r"d row 2: label True is a boolean; give each class an index \(0, 1\)"):
        tokenize_classification(rows, tok, 64, "d")


def test_jsonl_errors_name_the_file_line_not_the_row_count(tmp_path):
    """Blank lines are skipped, so the 2nd row of this file is on line 4: an error about it names line 4 (where an
    editor jumps with FILE:LINE), as the JSON syntax errors always did; it used to say "row 2"."""
    from alphalora.training.data import read_rows

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "the cat"}\n\n\n{"text": 7}\n\n{"text": "red"}\n{"text": "blue"}\n')
    tok = tiny_tokenizer("llama")
    with pytest.raises(DataError, match=r"d.jsonl:4: text is a number \(7\)"):
        tokenize_causal_lm(read_rows(path), tok, 64, str(path))
    path.write_text('{"text": "red"}\n\n{"text": "one two three four"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3 is \d+ tokens, longer than the 3 allowed"):
        tokenize_causal_lm(read_rows(path), tok, 3, str(path))
    with pytest.raises(DataError, match=r"leaves 2 of 2 rows \(lines 1 and 3\) no completion token"):
        tokenize_causal_lm(read_rows(path), tok, 1, str(path), truncate=True)
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": -1}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: label -1 is negative"):
        tokenize_classification(read_rows(path), tok, 64, str(path))
