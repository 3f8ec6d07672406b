"""The base model a run trains on: loaded with errors that name the broken file, and checked against the plan."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alphalora._io import first_line
from alphalora.allocation.plan import Plan
from alphalora.model_source import is_hub_id, model_folder

from .data import CLASSIFICATION_HINT, DataError

logger = logging.getLogger(__name__)

REDOWNLOAD = "download or copy the model again"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_base(model_dir: str | Path, task: str, num_labels: int | None, dtype):
    """(model, tokenizer) of a Hugging Face model folder or Hub id; a missing, truncated or corrupt file is a
    DataError naming the folder, the file and the fix, not transformers' or safetensors' traceback."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = model_folder(model_dir, DataError)
    if not (folder / "config.json").exists():
        raise DataError(f"model folder {folder} has no config.json; pass a Hugging Face model folder or Hub id")
    check_weight_files(folder)
    # A Hub id is loaded by its id (now cached), so the model and the adapters trained on it carry that name
    source = str(model_dir) if is_hub_id(model_dir) else folder
    if task == "causal-lm":
        refuse_encoder_as_causal_lm(folder)  # from its config alone, before the weights load
    tokenizer = _load_tokenizer(source, folder)
    missing: list[str] = []
    attention = soft_capped_attention(folder)
    try:
        if task == "causal-lm":
            model, loading = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True,
                                                                  **attention)
            missing = sorted(loading["missing_keys"])
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, dtype=dtype,
                                                                       **attention)
    except (OSError, ValueError, RuntimeError, KeyError, _safetensor_error()) as error:
        raise DataError(f"could not load the model in {folder} ({first_line(error)}); check that its config.json "
                        f"and weight files are complete and belong together, or {REDOWNLOAD}") from error
    if task == "causal-lm":
        refuse_new_output_head(model, missing, folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def soft_capped_attention(folder: Path) -> dict[str, str]:
    """`attn_implementation="eager"` for a model whose attention logits are soft-capped (Gemma 2): only
    transformers' eager attention applies the cap, and in transformers 5.17 (and before) Gemma 2 defaulted to
    sdpa, which leaves it out, so training would fit another function than the model's. Nothing for any other."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # (the model's loading names what is wrong with it)
    capped = isinstance(config, dict) and config.get("attn_logit_softcapping") is not None
    return {"attn_implementation": "eager"} if capped else {}


CLASSIFY_INSTEAD = f"to fine-tune it as a classifier, {CLASSIFICATION_HINT}"


def refuse_encoder_as_causal_lm(folder: Path) -> None:
    """DataError for an encoder (BERT, RoBERTa, MiniLM, ...) not configured as a decoder: it reads every token of
    a text at once, so as a causal LM it would see each token it is to predict, and transformers gives it a new,
    random LM head. (A config transformers cannot read is left to the model's loading, which names the problem.)"""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return
    if is_encoder(config):
        raise DataError(f"{folder} holds a {config.model_type} model, an encoder (its config does not set is_decoder): "
                        "it reads every token of a text at once, so it cannot be trained as a causal LM (--task "
                        f"causal-lm, the default), which predicts each token from those before it; {CLASSIFY_INSTEAD}"
                        ", or train a decoder model (Llama, Qwen, Mistral, GPT-2, ...) as a causal LM (a checkpoint "
                        "trained as a decoder says so with \"is_decoder\": true in its config.json)")


def is_encoder(config) -> bool:
    """Whether a model config is an encoder's: a family with a masked-LM head (BERT and its kin) that is neither
    set up as a decoder (is_decoder, XLM's causal) nor an encoder-decoder (BART's causal LM is its decoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    decoder = any(getattr(config, name, False) for name in ("is_decoder", "is_encoder_decoder", "causal"))
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not decoder


def refuse_new_output_head(model, missing: list[str], folder: Path) -> None:
    """DataError where the causal LM's output head was not in the checkpoint, so transformers initialised it at
    random: the head stays frozen while adapters train, and no adapter can make a random head predict text."""
    new = new_output_head_weights(model, missing)
    if new:
        shown = ", ".join(new[:3]) + (f" and {len(new) - 3} more" if len(new) > 3 else "")
        raise DataError(f"the checkpoint in {folder} has no output head for causal-LM training: {shown} "
                        f"{'is' if len(new) == 1 else 'are'} not in it (nor tied to its input embeddings), so "
                        "transformers initialised the head at random, and adapters cannot train through a frozen "
                        "random head; pass a checkpoint saved with its LM head (a ...ForCausalLM model, not the base "
                        f"...Model), or {CLASSIFY_INSTEAD}")


def new_output_head_weights(model, missing: list[str]) -> list[str]:
    """The weights among `missing` (the checkpoint's missing keys, which transformers initialised at random) that
    belong to the output head: those outside the base model (a decoder's lm_head, BERT's cls.predictions). A head
    tied to the input embeddings is never missing: it is the embedding matrix, loaded. Only parameters count:
    transformers also lists persistent buffers (tables it computes, not learns) among the missing keys."""
    parameters = {name for name, _ in model.named_parameters()}
    missing = [key for key in missing if key in parameters]
    names = {id(module): name for name, module in model.named_modules()}
    base = getattr(model, "base_model", model)
    if base is not model:
        inside = f"{names[id(base)]}."
        return [key for key in missing if not key.startswith(inside)]
    head = model.get_output_embeddings()  # no separate base model: the output embeddings are the head
    outside = names.get(id(head)) if head is not None else None
    return [key for key in missing if outside and key.startswith(f"{outside}.")]


def _load_tokenizer(source: str | Path, folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as error:
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            problem = f"it has no {' or '.join(TOKENIZER_FILES)}"
        else:
            problem = f"{first_line(error).rstrip(': ')}: its tokenizer files are incomplete or unreadable"
        raise DataError(f"could not load a tokenizer from {folder}: {problem}; copy the model's tokenizer files "
                        "(tokenizer.json, or tokenizer_config.json and the vocabulary files it names) from where the "
                        f"model came from, or {REDOWNLOAD}") from error


def _safetensor_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def check_weight_files(folder: Path) -> None:
    """Reads the header of each safetensors file the folder's weights live in (the shards its index names, or
    its *.safetensors files): a missing or truncated one is named here, before anything is loaded."""
    from safetensors import safe_open

    from alphalora.spectral.weights import WeightSourceError, checkpoint_files

    try:
        files = checkpoint_files(folder)
    except WeightSourceError as error:
        raise DataError(str(error)) from error
    for path in (f for f in files if f.suffix == ".safetensors"):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (_safetensor_error(), OSError) as error:
            raise DataError(f"{path} is truncated or corrupt ({first_line(error)}); {REDOWNLOAD}") from error


def warn_if_plan_for_another_model(plan: Plan, model_dir: str | Path, model) -> bool:
    """Logs one warning (and returns True) when the plan was made for another base model than `model_dir`.

    Decided by the config fingerprint when the plan records one (plan.source["base_fingerprint"]), else by
    name: a folder and a Hub id can name the same model, so names are compared leniently, and a plan is never
    refused for its name (its layers and modules were checked when it was built into the model)."""
    recorded = plan.base_model
    if not recorded:
        return False
    fingerprint = plan.source.get("base_fingerprint") if isinstance(plan.source, dict) else None
    if isinstance(fingerprint, str):
        from alphalora.adapters.io import base_fingerprint

        differs = fingerprint != base_fingerprint(model)
    else:
        differs = not same_model_name(recorded, model_dir)
    if differs:
        logger.warning("plan made for another model: the plan names %r, this run trains %r; it trains because its "
                       "layers and modules fit, but its allocation was computed for that model: re-allocate on "
                       "this one unless you meant it", recorded, str(model_dir))
    return differs


def same_model_name(recorded: str, model_dir: str | Path) -> bool:
    """Whether two names may name the same model: equal, the same folder, or (where one of them is not a folder
    here, e.g. a Hub id or a folder on another machine) the same last name component ("org/Llama-3" and
    ".../Llama-3", or a Hub cache snapshot of "org/Llama-3")."""
    if str(recorded) == str(model_dir):
        return True
    first, second = Path(str(recorded)).expanduser(), Path(str(model_dir)).expanduser()
    if first.exists() and second.exists():
        return first.resolve() == second.resolve()
    return _short_name(str(recorded)) == _short_name(str(model_dir))


def _short_name(name: str) -> str:
    parts = Path(name.rstrip("/")).parts
    for part in parts:  # a Hub cache snapshot: .../models--org--name/snapshots/<revision>
        if part.startswith("models--"):
            return part.split("--")[-1]
    return parts[-1] if parts else name
