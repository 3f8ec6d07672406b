"""Mixtures of experts: each expert's matrix as a weight entry of its own, from a live model or a checkpoint.

transformers 5 keeps a mixture of experts' matrices as 3-D parameters of one experts module (`mlp.experts`),
expert first: `gate_up_proj` (gate and up projections fused) and `down_proj` (`up_proj` alone where the experts
have no gate). Checkpoints hold them so (GPT-OSS, Llama 4) or per expert (`mlp.experts.3.gate_proj.weight`,
Mixtral's `block_sparse_moe.experts.3.w1.weight`), as transformers' save_pretrained writes Mixtral, Qwen-MoE,
OLMoE and DeepSeek. Either way each expert's matrix is one entry, named as the per-expert format names it
(`expert_matrices`), so a model analysed live and from either kind of checkpoint gives the same matrices. The
router beside the experts (`mlp.gate`, `mlp.router`) gets role "router" (`with_routers`).

The general walk (`weights.module_weights`, `weights.checkpoint_weights`) finds the fused parameters and tensors
and calls in here for their entries; per-expert tensors are ordinary 2-D weights it reads itself.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .entries import WeightEntry, WeightSourceError, named_entry
from .roles import is_router, moe_blocks

FUSED_EXPERT_PARAMS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its fused parameters: transformers' own flags for it (the
    `use_experts_implementation` decorator sets `is_transposed` and `is_concatenated` on the module, and its
    batched and grouped kernels read them).

    `transposed`: [E, in, out], applied as `x @ W[e]` (GPT-OSS, Llama 4, Aria); else [E, out, in], applied as
    `F.linear(x, W[e])` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...). `concatenated`: gate_up's outputs are
    [gate; up] (`chunk(2)`); else interleaved gate, up, gate, up, ... (GPT-OSS: `[..., ::2]`, `[..., 1::2]`)."""

    transposed: bool = False
    concatenated: bool = True


def is_fused_expert_tensor(key: str, shape: tuple[int, ...]) -> bool:
    """Whether a checkpoint tensor is a fused 3-D expert parameter (`...mlp.experts.gate_up_proj`, expert first)."""
    return len(shape) == 3 and key.rsplit(".", 1)[-1] in FUSED_EXPERT_PARAMS


def fused_expert_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The fused 3-D expert parameters a module holds itself ({} for any other module), by name."""
    own = dict(module.named_parameters(recurse=False))
    return {leaf: own[leaf] for leaf in FUSED_EXPERT_PARAMS if leaf in own and own[leaf].dim() == 3}


def inferred_transposed(shapes: dict[str, tuple[int, ...]], hidden_size: int | None = None) -> bool:
    """Whether fused expert parameters are stored [E, in, out], told by their shapes where no flag says so.

    gate_up [E, 2I, H] with down [E, H, I] is [E, out, in]; gate_up [E, H, 2I] with down [E, I, H] is [E, in, out];
    the two never both fit. Without a gate_up (up and down alone) the hidden size tells; where nothing does, the
    matrices are read [E, out, in] (transformers' default), which transposes at most the reported shape: a
    matrix and its transpose have the same spectrum, and only gate_up is split along its output side."""
    down, gate_up = shapes.get("down_proj"), shapes.get("gate_up_proj")
    if down is not None and gate_up is not None:
        if gate_up[2] == down[1] and gate_up[1] == 2 * down[2]:
            return False
        if gate_up[1] == down[2] and gate_up[2] == 2 * down[1]:
            return True
    if down is not None and hidden_size:
        if down[1] == hidden_size != down[2]:
            return False
        if down[2] == hidden_size != down[1]:
            return True
    return False


def expert_matrices(
    prefix: str, leaf: str, shape: tuple[int, ...], layout: ExpertsLayout
) -> list[tuple[str, int, tuple, tuple[int, int]]]:
    """(name, expert, index, (out, in) shape) of each expert's matrix in the fused parameter `prefix.leaf`.

    Names are `<prefix>.<expert>.<proj>`, as a per-expert checkpoint names the same matrix (without `.weight`):
    `model.layers.0.mlp.experts.3.down_proj`. A fused gate_up is split into its `gate_proj` and `up_proj`
    halves, the two matrices a per-expert checkpoint (and WeightWatcher, which reads each nn.Linear) holds, so
    a model analysed live and from either kind of checkpoint gives the same matrices and alphas. `index` picks
    the matrix out of the 3-D tensor; transposed in the layout, the picked part is (in, out)."""
    experts, first, second = shape
    out_features, in_features = (second, first) if layout.transposed else (first, second)
    if leaf == "gate_up_proj":
        if out_features % 2:
            raise WeightSourceError(f"{prefix}.{leaf} has an odd gate_up size {out_features}; it cannot be split")
        half = out_features // 2
        if layout.concatenated:
            parts = [("gate_proj", slice(0, half)), ("up_proj", slice(half, out_features))]
        else:
            parts = [("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))]
        matrix_shape = (half, in_features)
    else:
        parts = [(leaf, slice(None))]
        matrix_shape = (out_features, in_features)
    return [
        (f"{prefix}.{e}.{proj}", e, (e, slice(None), rows) if layout.transposed else (e, rows, slice(None)),
         matrix_shape)
        for e in range(experts) for proj, rows in parts
    ]


def _one_expert(part: torch.Tensor, transposed: bool) -> torch.Tensor:
    # Contiguous, so the matrix read live and read from a checkpoint is the same tensor, bit for bit.
    return (part.t() if transposed else part).contiguous()


def _live_part(param: torch.Tensor, index: tuple, transposed: bool) -> torch.Tensor:
    return _one_expert(param.detach()[index], transposed)


def live_expert_entries(prefix: str, module: nn.Module, fused: dict[str, torch.Tensor]) -> list[WeightEntry]:
    """One entry per expert and matrix of a live experts module, expert by expert, in the layout transformers
    set on the module (its `is_transposed` and `is_concatenated`), else told by the shapes."""
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool):
        hidden = next((v for a in ("hidden_size", "hidden_dim") if isinstance(v := getattr(module, a, None), int)),
                      None)
        transposed = inferred_transposed({leaf: tuple(p.shape) for leaf, p in fused.items()}, hidden)
    layout = ExpertsLayout(transposed, bool(getattr(module, "is_concatenated", True)))
    matrices = [(m, leaf) for leaf, param in fused.items()
                for m in expert_matrices(prefix, leaf, tuple(param.shape), layout)]
    matrices.sort(key=lambda item: item[0][1])  # expert by expert
    return [
        named_entry(name, shape, "linear", functools.partial(_live_part, fused[leaf], index, layout.transposed),
                    fused[leaf].is_floating_point())
        for (name, _, index, shape), leaf in matrices
    ]


def with_routers(entries: list[WeightEntry], other_names: Collection[str] = ()) -> list[WeightEntry]:
    """`entries` with role "router" for each mixture of experts' router: a `gate` or `router` in a block whose
    experts appear among the entries' names or `other_names` (say, fused expert tensors)."""
    blocks = moe_blocks({e.name for e in entries} | set(other_names))
    return [dataclasses.replace(e, role="router") if is_router(e.name, blocks) else e for e in entries]


def _config_hidden_size(config: dict) -> int | None:
    """The model's hidden size from its config.json's contents (or its text model's), None where it has none."""
    for source in (config, config.get("text_config") or {}):
        if isinstance(source, dict) and isinstance(source.get("hidden_size"), int):
            return source["hidden_size"]
    return None


def transformers_expert_layouts(folder: Path) -> dict[str, ExpertsLayout]:
    """transformers' own layout of each experts module of the model in `folder`, by module name: the flags its
    code sets on the module (`ExpertsLayout`), read off the model built from config.json on the meta device (no
    memory, no weight read). Empty where transformers cannot build it (no config, a model type it does not
    know, remote code) or sets no flags (an undecorated experts module); the shapes decide then."""
    if not (folder / "config.json").exists():
        return {}
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = transformers.AutoConfig.from_pretrained(str(folder))
                with torch.device("meta"):
                    model = transformers.AutoModel.from_config(config)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 - any failure to build it leaves the layout to the shapes
        return {}
    return {
        name: ExpertsLayout(module.is_transposed, bool(getattr(module, "is_concatenated", True)))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "is_transposed", None), bool)
    }


def _layout_for(module_name: str, layouts: dict[str, ExpertsLayout]) -> ExpertsLayout | None:
    """The layout of the experts module `module_name` (a checkpoint's name, which may carry a prefix the built
    model lacks, such as `model.`), or the one layout every experts module shares; None if unknown."""
    parts = module_name.split(".")
    for start in range(len(parts)):
        found = layouts.get(".".join(parts[start:]))
        if found is not None:
            return found
    distinct = set(layouts.values())
    return distinct.pop() if len(distinct) == 1 else None


def checkpoint_expert_entries(
    folder: Path, fused: list[tuple[str, tuple[int, ...], bool, Callable]], config: dict | None = None
) -> list[WeightEntry]:
    """One entry per expert and matrix of a checkpoint's fused 3-D expert tensors (key, shape, floating, load),
    named and split as a live model's (`expert_matrices`); each loads its expert alone (a slice of the file).
    The layout is transformers' for the model (`transformers_expert_layouts`), else told by the shapes (and the
    hidden size in `config`, the contents of the folder's config.json)."""
    if not fused:
        return []
    by_module: dict[str, dict[str, tuple[tuple[int, ...], bool, Callable]]] = {}
    for key, shape, floating, load in fused:
        module_name, _, leaf = key.rpartition(".")
        by_module.setdefault(module_name, {})[leaf] = (shape, floating, load)
    needs_flags = any("gate_up_proj" in params for params in by_module.values())
    layouts = transformers_expert_layouts(folder) if needs_flags else {}
    hidden = _config_hidden_size(config or {})
    entries = []
    for module_name, params in by_module.items():
        layout = _layout_for(module_name, layouts) or ExpertsLayout(
            inferred_transposed({leaf: shape for leaf, (shape, _, _) in params.items()}, hidden)
        )
        for leaf, (shape, floating, load) in params.items():
            for name, _, index, matrix_shape in expert_matrices(module_name, leaf, shape, layout):
                entries.append(named_entry(
                    name, matrix_shape, "linear",
                    functools.partial(_checkpoint_part, load, index, layout.transposed), floating,
                ))
    return entries


def _checkpoint_part(load: Callable, index: tuple, transposed: bool) -> torch.Tensor:
    return _one_expert(load(index), transposed)
