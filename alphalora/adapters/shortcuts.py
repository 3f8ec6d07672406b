"""LoRA-adapted shortcut connections (HeteroLoRA): low-rank maps on residual paths and cross-layer skips.

Per block l, with x_l the block input and h_l the state after the attention residual (the FFN's input):

- ``residual1``: the attention residual becomes (I + dW) x_l, i.e. dW x_l joins the attention sum;
- ``residual2``: the FFN residual becomes (I + dW) h_l, i.e. dW h_l joins the FFN sum;
- ``shortcut1``: a cross-layer skip from x_l over the whole block, dW x_l joins the FFN sum;
- ``shortcut2``: a cross-layer skip from h_{l-1} over FFN_{l-1} and Attn_l, joining the attention sum (l > 0).

Each dW = (alpha / r) B A starts at zero (B = 0), and every term is added *inside* the sum its
sub-block already forms (before a post-LN model's LayerNorm, straight into a pre-LN model's residual
stream), never followed by an extra normalisation: at initialisation the model computes exactly the
base model's function. (The authors' code re-applies the sub-block LayerNorm after each cross-layer
add, which changes the function even with every shortcut off.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from alphalora.allocation.plan import parse_shortcut

from .layer import adapter_dtype

SHORTCUTS_ATTRIBUTE = "alphalora_shortcuts"


class ShortcutError(ValueError):
    """A shortcut plan that this model's block layout cannot carry."""


class ShortcutLoRA(nn.Module):
    """dW h = scaling * B A h with A Kaiming-uniform and B zero; `enabled=False` makes it contribute nothing."""

    def __init__(self, features: int, rank: int, alpha: float, like: torch.Tensor):
        super().__init__()
        if not 1 <= rank <= features:
            raise ShortcutError(f"shortcut rank {rank} must be between 1 and the hidden size {features}")
        factory = {"device": like.device, "dtype": adapter_dtype(like.dtype)}
        # Same layout as a one-expert MoE-LoRA layer: [1, r, d] and [1, d, r].
        self.lora_A = nn.Parameter(torch.empty(1, rank, features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(1, features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A[0], a=math.sqrt(5))
        self.rank, self.features, self.scaling = rank, features, alpha / rank
        self.enabled = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        low = hidden.to(self.lora_A.dtype) @ self.lora_A[0].T
        return (low @ self.lora_B[0].T) * self.scaling

    def extra_repr(self) -> str:
        return f"features={self.features}, rank={self.rank}, scaling={self.scaling:g}"


@dataclass
class BlockLayout:
    """Where a block's attention and FFN sums are formed, and where h_l can be read."""

    attention_sum: nn.Module  # its output is added to the residual to form h_l
    ffn_sum: nn.Module  # its output is added to h_l to form the block output
    ffn_input: nn.Module  # its (first) input is h_l
    # Where the two modules above *take* the sums as their first input instead (a post-LN OPT block's LayerNorms:
    # its residual dropout is functional, so no module sits between a sub-block's dropout and the add).
    sums_are_inputs: bool = False


def block_layout(block: nn.Module) -> BlockLayout:
    """The sums of a Llama/Mistral/Qwen2/Gemma, GPT-2, BERT/RoBERTa or OPT block.

    A term joins a sum at the last module before the residual add: a pre-LN decoder's output
    projection (the module at that path, which is the LoRA wrapper where the projection is adapted,
    so the term joins base plus LoRA output whatever kernel the wrapper runs), and GPT-2's and BERT's
    residual dropout, so that the shortcut, a path beside the sub-block, is not dropped with it.
    OPT applies its residual dropout as a function, after out_proj and fc2: a post-LN OPT block (OPT-350M,
    HeteroLoRA's model) takes the terms at its LayerNorms' inputs, which are the sums themselves; a pre-LN one
    (the other OPT sizes) at its output for the FFN sum, and at out_proj for the attention sum, whose term is
    therefore dropped with the attention output in training (nothing else sees that sum before it is used).
    """
    def has(*path: str) -> bool:
        module = block
        for part in path:
            module = getattr(module, part, None)
            if module is None:
                return False
        return True

    # Gemma 2/3 normalise the sub-block outputs, OLMo 2 too (its post_attention_layernorm is applied to the
    # attention output, not to h_l): neither has a sum of the pre-LN form below.
    other_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    if has("self_attn", "o_proj") and has("mlp", "down_proj") and has("post_attention_layernorm") \
            and not any(has(norm) for norm in other_norms):
        return BlockLayout(block.self_attn.o_proj, block.mlp.down_proj, block.post_attention_layernorm)
    if has("attn", "resid_dropout") and has("mlp", "dropout") and has("ln_2"):
        return BlockLayout(block.attn.resid_dropout, block.mlp.dropout, block.ln_2)
    if has("attention", "output", "dropout") and has("output", "dropout") and has("intermediate"):
        return BlockLayout(block.attention.output.dropout, block.output.dropout, block.intermediate)
    # do_layer_norm_before is OPT's own: BART's and Marian's decoder blocks have the same modules, but post-LN
    # with no such flag (their final_layer_norm normalises the FFN sum), and are not to be wired as a pre-LN OPT's.
    if has("self_attn", "out_proj") and has("fc1") and has("fc2") and has("final_layer_norm") \
            and has("do_layer_norm_before"):
        return _opt_layout(block)
    why = ""
    if any(has(norm) for norm in other_norms):
        why = " (it normalises its sub-blocks' outputs, so there is no residual sum to add a shortcut to)"
    elif has("mlp", "experts") or has("block_sparse_moe"):
        why = " (its MLP is a mixture of experts, whose output has no down projection to add a shortcut to)"
    raise ShortcutError(
        f"shortcut connections support Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3, GPT-2, BERT/RoBERTa and OPT blocks, not "
        f"{type(block).__name__}{why}; allocate without --shortcuts for this model"
    )


def _opt_layout(block: nn.Module) -> BlockLayout:
    """OPT's sums (see `block_layout`); its blocks flatten h_l to (tokens, hidden) for the FFN."""
    if block.do_layer_norm_before:
        return BlockLayout(block.self_attn.out_proj, block, block.final_layer_norm)
    return BlockLayout(block.self_attn_layer_norm, block.final_layer_norm, block.fc1, sums_are_inputs=True)


@dataclass
class _Taps:
    """The block inputs x_l and FFN inputs h_l of the forward pass in progress."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.inputs.clear()
        self.ffn_inputs.clear()

    def __getstate__(self):
        # (copy.deepcopy, pickling: the activations of a forward belong to its graph, not to a copy)
        return {"inputs": {}, "ffn_inputs": {}}


def _added(output: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
    """output + terms, each term in the output's dtype and shape (OPT reads h_l flattened to (tokens, hidden))."""
    for term in terms:
        output = output + term.to(output.dtype).reshape(output.shape)
    return output


def attach_shortcuts(model: nn.Module, blocks: dict[int, nn.Module], ranks: dict[str, int], alpha: float,
                     hidden_size: int) -> dict[str, ShortcutLoRA]:
    """Adds the shortcuts named in `ranks` ("layer3.residual1" -> rank) to the blocks; returns them by name."""
    taps = _Taps()
    like = next(p for p in model.parameters() if p.is_floating_point())
    modules: dict[str, ShortcutLoRA] = {}
    by_layer: dict[int, dict[str, ShortcutLoRA]] = {}
    for name, rank in ranks.items():
        layer, kind = parse_shortcut(name)  # the plan validated the name
        if layer not in blocks:
            raise ShortcutError(f"shortcut {name}: the model has no block {layer}")
        module = ShortcutLoRA(hidden_size, rank, alpha, like)
        modules[name] = module
        by_layer.setdefault(layer, {})[kind] = module
    for layer, block in blocks.items():
        own = by_layer.get(layer, {})
        feeds_next = "shortcut2" in by_layer.get(layer + 1, {})
        if not own and not feeds_next:
            continue
        layout = block_layout(block)
        container = getattr(block, SHORTCUTS_ATTRIBUTE, None) or nn.ModuleDict()
        container.update(own)
        setattr(block, SHORTCUTS_ATTRIBUTE, container)
        _wire_block(block, layout, layer, own, taps)
    # Drops the references once the forward pass is over, also when it raised.
    model.register_forward_hook(functools.partial(_forget, taps), always_call=True)
    return modules


# The hooks are module-level functions bound with functools.partial, not closures: copy.deepcopy copies a partial's
# arguments through its memo, so a deep-copied model's hooks read its own blocks, shortcuts and taps (pickling, too).
def _wire_block(block: nn.Module, layout: BlockLayout, layer: int, own: dict[str, ShortcutLoRA],
                taps: _Taps) -> None:
    block.register_forward_pre_hook(functools.partial(_keep_input, taps, layer), with_kwargs=True)
    layout.ffn_input.register_forward_pre_hook(functools.partial(_keep_ffn_input, taps, layer), with_kwargs=True)
    for kinds, module, terms in ((("residual1", "shortcut2"), layout.attention_sum, _attention_terms),
                                 (("residual2", "shortcut1"), layout.ffn_sum, _ffn_terms)):
        if not any(kind in own for kind in kinds):
            continue
        terms = functools.partial(terms, taps, block, layer)
        if layout.sums_are_inputs:
            module.register_forward_pre_hook(functools.partial(_into_input, terms), with_kwargs=True)
        else:
            module.register_forward_hook(functools.partial(_into_output, terms))


def _forget(taps: _Taps, _model: nn.Module, _args, _output) -> None:
    taps.clear()


def _keep_input(taps: _Taps, layer: int, _module: nn.Module, args, kwargs) -> None:
    taps.inputs[layer] = args[0] if args else kwargs["hidden_states"]


def _keep_ffn_input(taps: _Taps, layer: int, _module: nn.Module, args, kwargs) -> None:
    taps.ffn_inputs[layer] = args[0] if args else kwargs["hidden_states"]


def _active(block: nn.Module, kind: str) -> ShortcutLoRA | None:
    """The block's switched-on shortcut of this kind, looked up at call time (the block's own, in a copy too)."""
    container = getattr(block, SHORTCUTS_ATTRIBUTE, None)
    module = container[kind] if container is not None and kind in container else None
    return module if module is not None and module.enabled else None


def _attention_terms(taps: _Taps, block: nn.Module, layer: int) -> list[torch.Tensor]:
    """The switched-on terms of the attention sum: dW x_l (residual1) and dW h_{l-1} (shortcut2)."""
    terms = []
    if (residual := _active(block, "residual1")) is not None:
        terms.append(residual(taps.inputs[layer]))
    if (skip := _active(block, "shortcut2")) is not None:
        terms.append(skip(taps.ffn_inputs[layer - 1]))
    return terms


def _ffn_terms(taps: _Taps, block: nn.Module, layer: int) -> list[torch.Tensor]:
    """The switched-on terms of the FFN sum: dW h_l (residual2) and dW x_l (shortcut1)."""
    terms = []
    if (residual := _active(block, "residual2")) is not None:
        terms.append(residual(taps.ffn_inputs[layer]))
    if (skip := _active(block, "shortcut1")) is not None:
        terms.append(skip(taps.inputs[layer]))
    return terms


def _into_output(terms, _module: nn.Module, _args, output):
    """A forward hook: the terms join the module's output (the first item of a block's tuple output)."""
    found = terms()
    if not found:
        return output
    if isinstance(output, tuple):
        return (_added(output[0], found), *output[1:])
    return _added(output, found)


def _into_input(terms, _module: nn.Module, args, kwargs):
    """A forward pre-hook: the terms join the module's first input (the sum a post-LN LayerNorm normalises)."""
    found = terms()
    return ((_added(args[0], found), *args[1:]), kwargs) if found else None  # (LayerNorms are called positionally)
