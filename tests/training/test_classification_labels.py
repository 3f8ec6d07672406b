"""A sequence-classification adapter records its classes (num_labels, id2label) in alphalora_config.json, and
loading it onto a model with another number of labels says how to load the base model instead."""

from __future__ import annotations

import json

import pytest
import torch

from alphalora.adapters import AdapterError
from alphalora.adapters.io import CONFIG_NAME, load_adapter, read_adapter_config, save_adapter
from alphalora.allocation import Plan
from alphalora.training import train
from tests.tiny_models import save_tiny, with_random_adapter


def _plan(heads=("classifier",)) -> Plan:
    return Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1], top_k_per_layer=[1, 1],
                target_modules=["q", "v"], rank=2, modules_to_save=list(heads))


def _classifier(num_labels: int = 2, **config):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=64, num_labels=num_labels,
                                                    **config)).eval()


def test_the_classes_round_trip_and_a_model_with_other_labels_is_told_how_to_load(tmp_path):
    trained = with_random_adapter(_classifier(3), _plan(), seed=4)
    ids = torch.randint(0, 128, (2, 7))
    expected = trained(input_ids=ids).logits
    folder = save_adapter(trained, tmp_path / "a", label_names=["neg", "neu", "pos"])
    config = read_adapter_config(folder)
    assert (config["num_labels"], config["id2label"]) == (3, {"0": "neg", "1": "neu", "2": "pos"})
    fresh = _classifier(config["num_labels"])
    load_adapter(fresh, folder)
    assert torch.equal(fresh(input_ids=ids).logits, expected)
    default = _classifier()  # from_pretrained's default: 2 labels
    with pytest.raises(AdapterError, match=r"classifier.weight: saved shape \(3, 32\) != \(2, 32\): the adapter was "
                                           r"trained with 3 labels and this model has 2; load the base model with "
                                           r"AutoModelForSequenceClassification.from_pretrained\(base, num_labels=3, "
                                           r"id2label=\{0: 'neg', 1: 'neu', 2: 'pos'\}\)"):
        load_adapter(default, folder)
    assert not hasattr(default, "alphalora_adapter")  # refused before any change


def test_without_names_the_model_config_names_the_classes_and_causal_lms_record_none(tmp_path):
    from tests.tiny_models import build

    named = with_random_adapter(_classifier(2, id2label={0: "ham", 1: "spam"}), _plan())
    assert read_adapter_config(save_adapter(named, tmp_path / "a"))["id2label"] == {"0": "ham", "1": "spam"}
    lm = with_random_adapter(build("llama"), Plan(method="uniform", base_model="tiny", experts_per_layer=[1, 1],
                                                  top_k_per_layer=[1, 1], target_modules=["q"], rank=2))
    config = read_adapter_config(save_adapter(lm, tmp_path / "lm"))
    assert "num_labels" not in config and "id2label" not in config
    with pytest.raises(AdapterError, match=r"2 label names \['a', 'b'\] for a model with 3 labels"):
        save_adapter(with_random_adapter(_classifier(3), _plan()), tmp_path / "b", label_names=["a", "b"])


def test_adapters_saved_before_the_labels_were_recorded_load_and_the_refusal_reads_the_head(tmp_path):
    folder = save_adapter(with_random_adapter(_classifier(3), _plan()), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["num_labels"], config["id2label"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    load_adapter(_classifier(3), folder)
    with pytest.raises(AdapterError, match=r"trained with 3 labels and this model has 2; .*from_pretrained\(base, "
                                           r"num_labels=3\)$"):
        load_adapter(_classifier(), folder)


@pytest.mark.parametrize("labels, message", [
    ({"num_labels": 0}, "num_labels must be a positive integer, got 0"),
    ({"num_labels": True}, "num_labels must be a positive integer, got True"),
    ({"num_labels": "3"}, "num_labels must be a int, got str"),
    ({"num_labels": 2, "id2label": {"0": "a", "2": "b"}}, r"id2label must map each class index \"0\" .. \"1\""),
    ({"id2label": {"0": "a", "1": 7}}, "id2label must map each class index"),
    ({"id2label": ["a", "b"]}, "id2label must be a dict"),
])
def test_recorded_labels_that_do_not_agree_are_refused(labels, message, tmp_path):
    folder = save_adapter(with_random_adapter(_classifier(2), _plan()), tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, **labels}))
    with pytest.raises(AdapterError, match=message):
        read_adapter_config(folder)


def test_a_trained_classifier_records_twelve_numeric_classes(tmp_path):
    """The audit's case: labels "0" .. "11" trained a 12-class head that only trainer_log.json described, and
    loading it onto from_pretrained's default 2 labels failed with the shapes alone."""
    from transformers import AutoModelForSequenceClassification

    model_dir = save_tiny("bert", tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sat", "label": str(n)}) for n in (10, 2, 11, 0, 1, 3, 4,
                                                                                             5, 6, 7, 8, 9)))
    result = train(model_dir, _plan(heads=()), data, tmp_path / "a", task="classification", max_steps=1,
                   progress=False)
    assert result.label_names == [str(n) for n in range(12)]
    config = read_adapter_config(result.adapter_dir)
    assert config["num_labels"] == 12 and config["id2label"] == {str(n): str(n) for n in range(12)}
    with pytest.raises(AdapterError, match=r"trained with 12 labels and this model has 2; load the base model with "
                                           r"AutoModelForSequenceClassification.from_pretrained\(base, num_labels=12"):
        load_adapter(AutoModelForSequenceClassification.from_pretrained(model_dir), result.adapter_dir)
    load_adapter(AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=12), result.adapter_dir)
