"""Causal-LM training refuses what it cannot train (an encoder, a checkpoint without its LM head) and says when a
data file looks like classification data, each before training starts."""

from __future__ import annotations

import json

import pytest
import transformers

from alphalora.allocation import Plan
from alphalora.cli import main
from alphalora.training import DataError, train
from tests.tiny_models import FAMILIES, MOE_FAMILIES, NORMED_BLOCK_FAMILIES, build, save_tiny, tiny_tokenizer

ENCODERS = ("bert", "roberta")
DECODERS = [family for family in {**FAMILIES, **NORMED_BLOCK_FAMILIES, **MOE_FAMILIES} if family not in ENCODERS]


def _plan(layers: int = 2) -> Plan:
    """One LoRA expert on every block's attention output (a role each tested family has); no base model named, so
    no "plan made for another model" warning."""
    return Plan(method="uniform", base_model="", experts_per_layer=[1] * layers, top_k_per_layer=[1] * layers,
                target_modules=["o"], rank=2, lora_alpha=4.0, lora_dropout=0.0)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl",
                        [{"text": "the cat sat on the mat"}, {"prompt": "one two", "completion": "three four"}] * 4)


def _refused_before_training(model_dir, data, out, match: str) -> str:
    with pytest.raises(DataError, match=match) as refused:
        train(model_dir, _plan(), data, out, max_steps=1, progress=False)
    assert not out.exists()  # nothing trained, nothing written
    return str(refused.value)


@pytest.mark.parametrize("family", ENCODERS)
def test_an_encoder_is_refused_as_a_causal_lm_pointing_to_classification(family, lm_data, tmp_path):
    """BERT-like encoders read a text's tokens all at once: as a causal LM (a new random head on a bidirectional
    encoder) they used to train to a loss near ln(vocab) without a word."""
    model_dir = save_tiny(family, tmp_path / family, initializer_range=0.5)
    message = _refused_before_training(model_dir, lm_data, tmp_path / "out", match="an encoder")
    assert message.startswith(f"{model_dir} holds a {family} model, an encoder (its config does not set is_decoder)")
    assert '--task classification (task="classification" in Python)' in message


def test_the_bundled_minilm_is_refused_as_a_causal_lm_from_the_command_line(minilm_dir, lm_data, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    _plan(layers=6).save(plan)
    assert main(["train", "--model", str(minilm_dir), "--plan", str(plan), "--data", str(lm_data),
                 "--out", str(tmp_path / "out"), "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alphalora train: error: {minilm_dir} holds a bert model, an encoder") and \
        "--task classification" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_decoder_checkpoint_without_its_lm_head_is_refused(lm_data, tmp_path):
    """A base model saved without its head (LlamaModel, untied embeddings) loads as a causal LM with a random
    lm_head, which adapters cannot train through."""
    folder = tmp_path / "llama-base"
    config_class, _, kwargs = FAMILIES["llama"]
    transformers.LlamaModel(config_class(**kwargs, initializer_range=0.5)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    message = _refused_before_training(folder, lm_data, tmp_path / "out", match="no output head")
    assert message.startswith(f"the checkpoint in {folder} has no output head for causal-LM training: lm_head.weight "
                              "is not in it (nor tied to its input embeddings)")
    assert "a ...ForCausalLM model" in message


def test_an_encoder_set_up_as_a_decoder_without_an_lm_head_is_refused_for_its_head(lm_data, tmp_path):
    model_dir = save_tiny("bert", tmp_path / "bert-decoder", is_decoder=True)
    message = _refused_before_training(model_dir, lm_data, tmp_path / "out", match="no output head")
    assert "cls.predictions." in message and " more are not in it" in message


def test_a_base_checkpoint_whose_head_is_tied_to_its_embeddings_is_not_refused(lm_data, tmp_path):
    """GPT-2's LM head is its input embedding matrix: a checkpoint without lm_head still has it."""
    folder = tmp_path / "gpt2-base"
    config_class, _, kwargs = FAMILIES["gpt2"]
    transformers.GPT2Model(config_class(**kwargs)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = train(folder, _plan(), lm_data, tmp_path / "out", max_steps=1, save_steps=100, progress=False)
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family", DECODERS)
def test_every_decoder_family_still_trains_as_a_causal_lm(family, lm_data, tmp_path):
    """Tied heads (Gemma, GPT-2) and mixture-of-experts decoders are neither encoders nor headless."""
    model_dir = save_tiny(family, tmp_path / family)
    result = train(model_dir, _plan(), lm_data, tmp_path / "out", max_steps=1, logging_steps=1, save_steps=100,
                   progress=False)
    assert any("loss" in entry for entry in result.log_history)


def test_classification_rows_under_the_causal_lm_task_are_warned_about_once(tmp_path, caplog):
    """Rows of text and label train a causal LM on their text alone: a labelled corpus may be meant so, so it is a
    warning naming the file and --task classification, not a refusal; unlabelled data is not warned about."""
    from alphalora.training.data import warn_if_classification_rows  # (here: the test fails, not its file's import)

    model_dir = save_tiny("llama", tmp_path / "llama")
    rows = [{"text": "the cat sat on the mat", "label": "animal"}, {"text": "red green blue", "label": "colour"}] * 4
    labelled = _write_jsonl(tmp_path / "cls.jsonl", rows)
    with caplog.at_level("WARNING", logger="alphalora.training"):
        train(model_dir, _plan(), labelled, tmp_path / "out", max_steps=1, save_steps=100, progress=False)
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("alphalora")]
    assert warning == (f"{labelled}: 8 of 8 rows have a label beside their text; causal-LM training (--task "
                       "causal-lm, the default) ignores labels and trains on the text alone; if this is "
                       'classification data, pass --task classification (task="classification" in Python)')
    caplog.clear()
    with caplog.at_level("WARNING", logger="alphalora.training"):
        assert not warn_if_classification_rows([{"text": "a"}, {"text": "b", "label": 1}], "few.jsonl")
        assert not warn_if_classification_rows([{"prompt": "a", "completion": "b", "label": 1}], "pairs.jsonl")
        assert warn_if_classification_rows([{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c"}],
                                           "most.jsonl")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["most.jsonl"]


def test_a_sentence_and_label_row_under_the_causal_lm_task_points_to_classification(tmp_path):
    model_dir = save_tiny("llama", tmp_path / "llama")
    data = _write_jsonl(tmp_path / "sst.jsonl", [{"sentence": "the cat sat", "label": 1}])
    with pytest.raises(DataError, match=r"sst\.jsonl:1: a causal-LM row needs .*; for classification data \(text or "
                                        r"sentence, with label\), pass --task classification"):
        train(model_dir, _plan(), data, tmp_path / "out", max_steps=1, progress=False)


def test_only_missing_parameters_count_as_a_new_head_not_missing_buffers():
    """transformers lists persistent buffers (computed tables) among the missing keys too; a buffer outside the base
    model is no random head."""
    import torch

    from alphalora.training.model import new_output_head_weights

    model = build("llama")
    model.register_buffer("position_table", torch.zeros(4))  # persistent, outside the base model
    assert new_output_head_weights(model, ["position_table"]) == []
    assert new_output_head_weights(model, ["position_table", "lm_head.weight"]) == ["lm_head.weight"]
