"""A base model named as a local folder or as a Hugging Face Hub id (`org/name`), as every tool of the field takes it.

A Hub id resolves to its snapshot in the Hub's local cache (`HF_HUB_CACHE`), fetched when online, read from
the cache alone with `HF_HUB_OFFLINE=1`: config, tokenizer and the weight files, safetensors where the
repository has them (only the shards its index names, not the consolidated copies some repositories add).
"""

from __future__ import annotations

import json
from pathlib import Path

from alphalora._io import first_line

# What a model folder needs besides its weights: config, generation config, tokenizer, chat template.
_METADATA = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_id(name_or_path: str | Path) -> bool:
    """Whether this names a Hub repository rather than a local path: no such path here, and a valid repo id."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def default_served_name(name_or_path: str | Path) -> str:
    """The model's name for clients: a Hub id as given (vLLM's default), else the folder's name."""
    return str(name_or_path) if is_hub_id(name_or_path) else Path(name_or_path).name


def model_folder(name_or_path: str | Path, error: type[Exception] = ValueError, revision: str | None = None) -> Path:
    """The local folder of a model: the path itself, or a Hub id's snapshot in the Hub cache (fetched when
    needed). A path that does not exist is returned as it is, for the caller's own message; a Hub id that
    cannot be fetched raises `error` saying why and what to do."""
    if not is_hub_id(name_or_path):
        return Path(name_or_path).expanduser()
    repo_id = str(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))

    try:
        folder = fetch(_METADATA)
        index = next((folder / name for name in _WEIGHT_INDEXES if (folder / name).exists()), None)
        if index is not None:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            return fetch([*_METADATA, *shards])
        for single in _SINGLE_WEIGHT_FILES:
            folder = fetch([*_METADATA, single])
            if (folder / single).exists():
                return folder
        return fetch([*_METADATA, "*.safetensors"])
    except GatedRepoError as denied:
        raise error(f"{repo_id} is a gated model on the Hugging Face Hub: accept its licence on its page and log "
                    "in with `hf auth login` (or set HF_TOKEN), or pass a local folder") from denied
    except RepositoryNotFoundError as missing:
        raise error(f"{repo_id} is neither a local folder nor a model on the Hugging Face Hub (private ones need "
                    "`hf auth login`); pass a model folder or a Hub id such as meta-llama/Llama-3.1-8B") from missing
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as unreachable:
        from huggingface_hub import constants

        retry = "unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "connect and retry"
        raise error(f"{repo_id} is not a local folder and the Hugging Face Hub could not provide it "
                    f"({first_line(unreachable)}); {retry}, or pass a local model folder") from unreachable
