"""Training data checks: --truncate cuts long rows the documented way; classification labels are class indices
or names, with at least two classes."""

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
    ([0, -1], "row 2: label -1 is negative"),
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
