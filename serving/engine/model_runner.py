"""One forward step over a ragged batch: paged KV cache, per-sequence adapters, last-token logits.

The base model is a `transformers` decoder of the Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3,
Phi-3): its own modules (embeddings, norms - sub-block output norms included -, projections - fused ones
too -, the per-head query/key norms, MLP activation, rotary embeddings and its own rotary function) are
reused (what differs between the families: `family`);
attention is replaced by paged attention over the KV pool, and every adapted projection adds
the adapters' deltas for the tokens that asked for them, through the routing kernels (block-level
parts, shortcut connections and shared routers: `block_adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from alphalora import ops
from alphalora.adapters.routing import dense_gates

from .adapter_stacks import AdapterStack, AdapterStacks
from .adapters import LoadedAdapter
from .block_adapters import (
    BlockGates,
    add_block_routed,
    add_shortcuts,
    block_level_rows,
    route_block,
    step_shortcuts,
)
from .family import RotaryEmbeddings, attention_windows, check_servable, rotary_function, softcapped_attention
from .routing_layout import BucketLayout, build_bucket_layout
from .step_inputs import DeviceStep, SequenceBatchEntry, StepBatch, to_device

PAGED_MAX_HEAD_DIM = 256  # the widest head the paged decode attention kernel holds (csrc/attention, CUDA)


class PagedModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, max_model_len: int):
        config = model.config
        check_servable(config)
        self.model = model.eval()
        self.config = config
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.windows = attention_windows(config)
        self.apply_rotary = rotary_function(self.layers[0].self_attn)
        self.attention_softcap = getattr(config, "attn_logit_softcapping", None)  # Gemma 2
        self.final_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
        weight = self.decoder.embed_tokens.weight
        shape = (len(self.layers), num_blocks * block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v_cache = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.rotary = RotaryEmbeddings(self.decoder, config, max_model_len, weight)
        self.module_names = {id(m): n for n, m in model.named_modules()}
        self.stacks = AdapterStacks()  # adapters' weights per module, each adapter at a fixed offset
        self._step_layouts: dict[tuple, BucketLayout] = {}  # this step's routing layouts, by bucket
        self._buckets: dict[str, list[_Bucket]] = {}  # per module, for the adapters of `_buckets_for`
        self._buckets_for: tuple[int, ...] = ()  # the adapters (uids, in step order) the buckets are for
        self._block_gates: BlockGates = []  # this block's shared-router gates, per adapter that has them

    def kv_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # -- adapters ----------------------------------------------------------------------------------
    def _project(self, module, hidden: torch.Tensor,
                 adapter_rows: list[tuple[LoadedAdapter, np.ndarray]]) -> torch.Tensor:
        """module(hidden) plus each sequence's adapter delta on its own tokens.

        Adapters of the same rank and top-k share one routing-kernel call over "virtual" experts
        (the adapter's offset in the module's stack + expert), so a batch of many adapters costs a
        few kernel calls, at true ranks, reading weights stacked once rather than per step. Where one
        such bucket holds every token of the step, one plain adapter is two GEMMs and a few narrow
        experts one dense-masked product (see `routing_layout`).
        """
        out = module(hidden)
        name = self.module_names[id(module)]
        for bucket in self._module_buckets(name, adapter_rows):
            layout = self._step_layouts.get(bucket.layout_key)
            if layout is None:
                rows = [adapter_rows[i] for i in bucket.positions]
                layout = build_bucket_layout(name, rows, bucket.experts, bucket.routers, hidden.shape[0],
                                             hidden.shape[1], hidden.device)
                self._step_layouts[bucket.layout_key] = layout
            A, B = bucket.experts.tensors
            if layout.only_adapter is not None:  # one plain LoRA adapter for every token: two GEMMs
                expert, scaling = layout.only_adapter
                out.addmm_(hidden @ A[expert].T, B[expert].T, alpha=scaling)
                continue
            if layout.dense:  # few, narrow experts: every one for every token, the unchosen gated to zero
                out.addmm_(self._dense_masked(bucket, hidden, layout), bucket.experts.up_dense.T)
                continue
            gates, ids = self._route(bucket, hidden, layout)
            if layout.rows is None:  # every token of the step, in batch order: no gather, no scatter
                out.add_(ops.moe_lora(hidden, A, B, gates, ids, ids_in_range=True))
            else:
                out.index_add_(0, layout.rows, ops.moe_lora(hidden[layout.rows], A, B, gates, ids, ids_in_range=True))
        if self._block_gates:
            add_block_routed(out, name, hidden, self._block_gates)
        return out

    def _module_buckets(self, name: str, adapter_rows: list[tuple[LoadedAdapter, np.ndarray]]) -> list[_Bucket]:
        """The step's adapters of module `name` in buckets of one rank and top-k, with their stacks and
        the key of their routing layout. Kept while the step's adapters stay the same (most steps):
        only rows change from step to step, and the layouts are rebuilt from them."""
        buckets = self._buckets.get(name)
        if buckets is not None:
            return buckets
        members: dict[tuple[int, int], list[int]] = {}  # (rank, top_k) -> positions in adapter_rows
        for position, (adapter, _) in enumerate(adapter_rows):
            weights = adapter.modules.get(name)
            if weights is not None and not weights.shared_router:  # those: `add_block_routed`
                members.setdefault((weights.rank, weights.top_k), []).append(position)
        buckets = []
        for (rank, _), positions in members.items():
            adapters = [adapter_rows[i][0] for i in positions]
            experts = self.stacks.experts(name, rank, adapters)
            routed: dict[int, list[LoadedAdapter]] = {}  # expert count -> the adapters with routers of that count
            for adapter in adapters:
                if adapter.modules[name].router is not None:
                    routed.setdefault(adapter.modules[name].num_experts, []).append(adapter)
            routers = {count: self.stacks.routers(name, count, group) for count, group in routed.items()}
            # Modules whose buckets agree on all of this share one layout a step (usually all of them).
            described = []
            for adapter in adapters:
                module = adapter.modules[name]
                router = routers.get(module.num_experts) if module.router is not None else None
                described.append((adapter.uid, module.num_experts, module.top_k, module.scaling,
                                  experts.offsets[adapter.uid],
                                  None if router is None else (router.offsets[adapter.uid], router.rows)))
            key = (tuple(described), experts.rows, rank, experts.tensors[0].shape[2])
            buckets.append(_Bucket(positions, experts, routers, key))
        self._buckets[name] = buckets
        return buckets

    def _dense_masked(self, bucket: _Bucket, hidden: torch.Tensor, layout: BucketLayout) -> torch.Tensor:
        """[tokens, experts * rank]: every stacked expert's down-projection of every token, times the
        token's gate for it (its adapter's scaling, or its router's renormalised top-k weight; zero
        for every expert it does not use)."""
        A = bucket.experts.tensors[0]
        gates = layout.dense_gates
        if gates is None:  # routed: this module's routers choose
            gates = dense_gates(*self._route(bucket, hidden, layout, torch.float32), A.shape[0])
        down = (hidden @ A.view(-1, A.shape[-1]).T).view(hidden.shape[0], A.shape[0], -1)
        # Gated in float32 and rounded once, as the routing kernels and the training layer do.
        return (down * gates[:, :, None]).to(hidden.dtype).view(hidden.shape[0], -1)

    def _route(self, bucket: _Bucket, hidden: torch.Tensor, layout: BucketLayout,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled gates [n, k] in `dtype` (default: the hidden states'), virtual expert ids [n, k]) for
        the layout's rows.

        Adapters with routers of the same expert count are routed together: one GEMM against the
        module's stack of such routers, then each token keeps the logits of its own adapter's router.
        Plain LoRA tokens have fixed gates and ids, so only the routers' part is computed per module.
        """
        dtype = dtype or hidden.dtype
        plain = layout.plain_ids is not None and layout.plain_ids.shape[0] > 0
        gates_all, ids_all = ([layout.plain_gates.to(dtype)], [layout.plain_ids]) if plain else ([], [])
        for group in layout.groups:
            routers = bucket.routers[group.num_experts].tensors[0]
            tokens = hidden if group.rows is None else hidden[group.rows]
            # each token's own router's top-k: gates times its scaling, ids at its adapter's offset
            gates, ids = ops.select_experts(tokens @ routers.T, group.member, group.scale, group.base,
                                            group.num_experts, group.top_k)
            gates_all.append(gates.to(dtype))
            ids_all.append(ids)
        if len(gates_all) == 1:
            return gates_all[0], ids_all[0]
        return torch.cat(gates_all), torch.cat(ids_all)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()  # no autograd dispatch at all (the routing ops' autograd wrappers included)
    def forward(self, batch: StepBatch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [num_sequences, vocab] of each sequence's last new token, and all new tokens'
        logits for entries that asked (by entry index); writes the new KV."""
        device = self.k_cache.device
        step = to_device(batch, device, self.windows)
        entries = step.entries
        hidden = self._embed(step.input_ids, entries)
        if self.config.model_type == "gemma" and not hasattr(self.decoder.embed_tokens, "embed_scale"):
            # Older transformers scale Gemma's embeddings in the model; newer ones in the embedding.
            hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        rotations = self.rotary.step(hidden, step.positions)
        adapters = step.adapter_rows
        self._step_layouts = {}
        uids = tuple(adapter.uid for adapter, _ in adapters)
        if uids != self._buckets_for:
            self._buckets, self._buckets_for = {}, uids
        block_rows = block_level_rows(adapters, hidden.shape[0], hidden.device)
        shortcuts = step_shortcuts(adapters, block_rows)
        ffn_input = None  # h_{l-1}, the previous block's FFN input (shortcut2 reads it)
        routes_blocks = any(adapter.layer_routers for adapter, _ in adapters)
        for index, layer in enumerate(self.layers):
            residual = hidden
            self._block_gates = route_block(adapters, block_rows, index, hidden) if routes_blocks else []
            hidden = layer.input_layernorm(hidden)
            attention = layer.self_attn
            q, k, v = self._qkv(attention, hidden, adapters)
            q, k = self.apply_rotary(q.transpose(0, 1)[None], k.transpose(0, 1)[None], *rotations[index])
            q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
            self.k_cache[index].index_copy_(0, step.new_slots, k)
            self.v_cache[index].index_copy_(0, step.new_slots, v)
            attended = self._attention(index, q, step, self.windows[index], attention.scaling)
            block_input = residual
            attention_sum = self._project(attention.o_proj, attended, adapters)
            if shortcuts:
                add_shortcuts(attention_sum, shortcuts, index, residual1=block_input, shortcut2=ffn_input)
            sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma 2 and 3 normalise each sub-block's output
            if sandwich:
                attention_sum = layer.post_attention_layernorm(attention_sum)
            hidden = residual + attention_sum
            residual = ffn_input = hidden
            hidden = (layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm)(hidden)
            ffn_sum = self._mlp(layer.mlp, hidden, adapters)
            if shortcuts:
                add_shortcuts(ffn_sum, shortcuts, index, residual2=ffn_input, shortcut1=block_input)
            if sandwich:
                ffn_sum = layer.post_feedforward_layernorm(ffn_sum)
            hidden = residual + ffn_sum
        logits = self._logits(self.decoder.norm(hidden[step.last_rows]), [e.adapter for e in entries])
        every = {i: self._capped(self._with_heads(self.model.lm_head,
                                                  self.decoder.norm(hidden[e.start:e.start + e.count]),
                                                  [(e.adapter, 0, e.count)]).float())
                 for i, e in enumerate(entries) if e.all_logits}
        return logits, every

    def _qkv(self, attention, hidden: torch.Tensor, adapters) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries [tokens, heads, head_dim], keys and values [tokens, kv heads, head_dim] before rotation:
        from q/k/v projections or one fused qkv projection (Phi-3), through per-head norms where the model
        has them (Qwen3's q_norm and k_norm)."""
        sizes = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        projected = [self._project(projection, hidden, adapters) for projection in _qkv_projections(attention)]
        if len(projected) == 1:  # fused
            q, k, v = projected[0].split([heads * self.head_dim for heads in sizes], dim=-1)
        else:
            q, k, v = projected
        q, k, v = (states.view(-1, heads, self.head_dim) for states, heads in zip((q, k, v), sizes, strict=True))
        if hasattr(attention, "q_norm"):
            q, k = attention.q_norm(q), attention.k_norm(k)
        return q, k, v

    def projected_modules(self) -> frozenset[str]:
        """The names of the linears `_project` runs, the only ones adapters are added to: each block's attention
        projections and its dense MLP's (a mixture-of-experts block runs as the model's own module)."""
        modules = []
        for layer in self.layers:
            attention, mlp = layer.self_attn, layer.mlp
            modules += [*_qkv_projections(attention), attention.o_proj]
            if _is_mixture(mlp) and hasattr(mlp, "shared_expert"):
                mlp, gate = mlp.shared_expert, mlp.shared_expert_gate
                modules.append(gate)
            if not _is_mixture(mlp):
                modules += [*_gate_up_projections(mlp), mlp.down_proj]
        return frozenset(self.module_names[id(module)] for module in modules)

    def _mlp(self, mlp, hidden: torch.Tensor, adapters) -> torch.Tensor:
        """The gated MLP: gate and up projections, or one fused gate_up projection (Phi-3, gate first). A
        mixture-of-experts block's routed experts are the model's own module, without adapters; Qwen2-MoE's
        shared expert beside them, scaled by its sigmoid gate, is a gated MLP with adapters like any other."""
        if _is_mixture(mlp) and hasattr(mlp, "shared_expert"):
            _, weights, chosen = mlp.gate(hidden)
            shared = self._mlp(mlp.shared_expert, hidden, adapters)
            gate = torch.sigmoid(self._project(mlp.shared_expert_gate, hidden, adapters))
            return mlp.experts(hidden, chosen, weights) + gate * shared
        if _is_mixture(mlp):
            return mlp(hidden[None])[0]
        projected = [self._project(projection, hidden, adapters) for projection in _gate_up_projections(mlp)]
        if len(projected) == 1:  # fused
            (gate, up), activation = projected[0].chunk(2, dim=-1), mlp.activation_fn
        else:
            (gate, up), activation = projected, mlp.act_fn
        return self._project(mlp.down_proj, activation(gate) * up, adapters)

    # -- modules an adapter replaces (modules_to_save) --------------------------------------------------
    def swappable_heads(self) -> dict[str, torch.nn.Module]:
        """The modules an adapter may replace for its own tokens, by name: the input embedding and the LM head."""
        return {self.module_names[id(m)]: m for m in (self.decoder.embed_tokens, self.model.lm_head)}

    def _with_heads(self, module, inputs: torch.Tensor,
                    spans: list[tuple[LoadedAdapter | None, int, int]]) -> torch.Tensor:
        """module(inputs); rows [start, start + count) of each span whose adapter replaces the module
        (modules_to_save) are computed with that adapter's weights instead."""
        out = module(inputs)
        name = self.module_names[id(module)]
        owners: dict[int, tuple[LoadedAdapter, list[torch.Tensor]]] = {}
        for adapter, start, count in spans:
            if adapter is not None and name in adapter.heads:
                span = torch.arange(start, start + count, device=inputs.device)
                owners.setdefault(adapter.uid, (adapter, []))[1].append(span)
        for adapter, rows in owners.values():
            index = torch.cat(rows)
            out[index] = torch.func.functional_call(module, adapter.heads[name], (inputs[index],)).to(out.dtype)
        return out

    def _embed(self, input_ids: torch.Tensor, entries: list[SequenceBatchEntry]) -> torch.Tensor:
        spans = [(e.adapter, e.start, e.count) for e in entries]
        return self._with_heads(self.decoder.embed_tokens, input_ids, spans)

    def _logits(self, normed: torch.Tensor, adapters: list[LoadedAdapter | None]) -> torch.Tensor:
        """LM-head logits of `normed`, one row per entry of `adapters`."""
        spans = [(adapter, row, 1) for row, adapter in enumerate(adapters)]
        return self._capped(self._with_heads(self.model.lm_head, normed, spans).float())

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final logit soft-capping, cap * tanh(logits / cap), as its LM head applies it."""
        if self.final_softcap is None:
            return logits
        return torch.tanh(logits / self.final_softcap) * self.final_softcap

    def _attention(self, layer: int, q: torch.Tensor, step: DeviceStep, window: int | None,
                   scaling: float) -> torch.Tensor:
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        decode = step.decode
        if decode is not None:
            query = q if decode.every_token else q[decode.rows]
            if self.attention_softcap is None and (q.device.type == "cpu" or self.head_dim <= PAGED_MAX_HEAD_DIM):
                # Every one-token sequence at once, keys and values read in place in the paged cache.
                result = ops.paged_decode_attention(query, self.k_cache[layer], self.v_cache[layer], decode.slots,
                                                    decode.lengths, decode.starts[window], scaling)
            else:  # a soft cap (Gemma 2), or heads too wide for the GPU kernel: one padded gather, then attention
                keys, values = self._gather(layer, decode.slots)
                result = self._attend(query[:, :, None, :], keys, values, decode.mask(window), scaling)[:, :, 0, :]
            result = result.reshape(result.shape[0], -1)
            if decode.every_token:
                return result
            out[decode.rows] = result
        for group in step.prefills:
            # Sequences with several new tokens (prompt chunks): one padded attention call per group.
            keys, values = self._gather(layer, group.slots)
            query = q[group.query_rows.reshape(-1)].view(*group.query_rows.shape, self.num_heads, -1).transpose(1, 2)
            result = self._attend(query, keys, values, group.mask(window), scaling)
            out[group.kept_rows] = result.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim)[group.kept]
        return out

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scaling: float) -> torch.Tensor:
        """query [B, heads, Q, D] over keys and values [B, kv heads, W, D] where mask [B, 1, Q, W] allows."""
        if self.attention_softcap is not None:
            return softcapped_attention(query, keys, values, mask, scaling, self.attention_softcap)
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                              enable_gqa=self.num_heads != self.num_kv_heads)

    def _gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv heads, W, head_dim] of the cache slots [B, W]."""
        batch, width = slots.shape
        flat = slots.reshape(-1)
        return tuple(cache[layer].index_select(0, flat).view(batch, width, self.num_kv_heads, -1).transpose(1, 2)
                     for cache in (self.k_cache, self.v_cache))


def _qkv_projections(attention: torch.nn.Module) -> list[torch.nn.Module]:
    """The projections making queries, keys and values: one fused qkv_proj (Phi-3), or q_proj, k_proj, v_proj."""
    if hasattr(attention, "qkv_proj"):
        return [attention.qkv_proj]
    return [attention.q_proj, attention.k_proj, attention.v_proj]


def _gate_up_projections(mlp: torch.nn.Module) -> list[torch.nn.Module]:
    """A gated MLP's input projections: one fused gate_up_proj (Phi-3, gate first), or gate_proj and up_proj."""
    return [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]


def _is_mixture(mlp: torch.nn.Module) -> bool:
    """Whether a block's MLP is a mixture of experts (its experts are one module, routed by its own gate)."""
    return isinstance(getattr(mlp, "experts", None), torch.nn.Module)


@dataclass
class _Bucket:
    """A module's adapters of one rank and top-k in the step: one routing-kernel call."""

    positions: list[int]  # the adapters' places in the step's adapter rows
    experts: AdapterStack  # the module's expert stack holding them
    routers: dict[int, AdapterStack]  # its router stacks, by expert count, for the routed ones
    layout_key: tuple  # buckets with equal keys route alike: one layout a step between them
