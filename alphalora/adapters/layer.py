"""The mixture-of-LoRA-experts linear layer (plain LoRA when it has one expert)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alphalora import ops

from .fused import dense_moe_lora, lora_linear
from .routing import BalanceStatistics, dense_gates, stable_top_k, top_k_gates


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # weight is (in, out)
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and GPT-2 Conv1D are supported")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of an adapter's parameters over a base in `base_dtype`: float32 over a half-precision base (as
    PEFT's `autocast_adapter_dtype`), so that AdamW's updates, most of them under bfloat16's resolution of the
    weights, are not rounded away; the base's dtype otherwise. The forward computes in the input's dtype."""
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


class MoELoRALinear(nn.Module):
    """base(x) + scaling * sum over the top-k experts e of g_e(x) * B_e A_e dropout(x).

    The router is a bias-free linear over the undropped input (MoLA); gates are the softmax
    probabilities of the top-k experts renormalised to sum to 1 (with `renormalize=False`, the
    softmax probabilities over all experts of the k chosen, as they are). With one expert there is no
    router and this is plain LoRA. `shared_gates`, when set by a layer-level router, replaces
    this module's own router. The layer wraps the base module and knows nothing of the model.
    """

    KERNELS = ("auto", "dense", "grouped")

    def __init__(self, base: nn.Module, num_experts: int, top_k: int, rank: int, lora_alpha: float,
                 dropout: float = 0.0, own_router: bool = True, kernel: str = "auto", renormalize: bool = True):
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k ({top_k}) <= num_experts ({num_experts})")
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        self.in_features, self.out_features = base_features(base)
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.renormalize = renormalize
        self.scaling = lora_alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank, **factory))
        self.router = (nn.Linear(self.in_features, num_experts, bias=False, **factory)
                       if num_experts > 1 and own_router else None)
        self.balance: BalanceStatistics | None = None  # set by the model wrapper to collect aux-loss stats
        self.shared_gates: torch.Tensor | None = None  # [T, E], set per forward by a shared router
        self.enabled = True  # HeteroLoRA switches modules off (they keep their weights)
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {self.KERNELS}, got {kernel!r}")
        self.kernel = kernel  # "auto": chosen per call by `kernel_for`
        self.reset_adapter_parameters()

    def kernel_for(self, device_type: str, dtype: torch.dtype) -> str:
        """The path a forward on `device_type` computing in `dtype` takes: "dense" (every expert's columns for
        every token, the unchosen ones gated to zero) or "grouped" (tokens gathered per expert).

        Dense-masked experts cost E*r extra columns on every token, the grouped kernels k*r. On the CPU, and in
        float32 on a GPU, past about half the input width the gather/scatter path costs less (an H100 at
        E*r = in/4: dense 9.8 ms of adapter time against grouped 17.3 ms, fp32, hidden 4096, 8192 tokens). In
        half precision on a GPU the dense products run on the tensor cores and the grouped kernels do not (the
        same H100 row in bf16: dense 1.0 ms against grouped 16 ms), so there dense is kept up to twice the
        input width."""
        if self.kernel != "auto":
            return self.kernel
        tensor_cores = device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        limit = 2 * self.in_features if tensor_cores else self.in_features // 2
        return "grouped" if self.num_experts > 1 and self.num_experts * self.rank > limit else "dense"

    def __getstate__(self):
        # (copy.deepcopy, pickling: a shared router's gates belong to the forward that set them, not to a copy)
        return {**super().__getstate__(), "shared_gates": None}

    def reset_adapter_parameters(self) -> None:
        """PEFT's LoRA initialisation: A Kaiming-uniform (a = sqrt 5), B zero, so the delta starts at 0."""
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def routing(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (gates, expert ids), each [T, k], for flattened tokens x2."""
        if self.shared_gates is not None:
            return stable_top_k(self._shared_gates(), self.top_k)
        logits = F.linear(x2, self.router.weight.to(x2.dtype))
        gates, ids = top_k_gates(logits, self.top_k, self.renormalize)
        if self.balance is not None and self.training:
            self.balance.add(logits, ids)
        return gates, ids

    def gates(self, x2: torch.Tensor) -> torch.Tensor | None:
        """[T, E] routing weights for flattened tokens x2 (None for a single expert)."""
        if self.num_experts == 1:
            return None
        if self.shared_gates is not None:
            return self._shared_gates()
        gates, ids = self.routing(x2)
        return dense_gates(gates, ids, self.num_experts)

    def _shared_gates(self) -> torch.Tensor:
        """The gates the block's shared router set, refused where they were computed with autograd and are read
        without it: the forward of reentrant gradient checkpointing, which the block's router hook runs outside of
        (the backward would then run through the router's graph once per recomputation and fail)."""
        if self.shared_gates.requires_grad and not torch.is_grad_enabled():
            from .inject import AdapterError

            raise AdapterError("a shared router computes its block's gates outside the block's checkpointed forward, "
                               "which reentrant gradient checkpointing cannot train; enable checkpointing with "
                               "gradient_checkpointing_kwargs={'use_reentrant': False} (as `alphalora train` does)")
        return self.shared_gates

    def _down(self, x2: torch.Tensor) -> torch.Tensor:
        """Every expert's down-projection of the flattened tokens, gated and scaled: [T, E*r]."""
        gates = self.gates(x2)
        # Dense-masked form: all experts' A in one GEMM (E*r columns, small next to the hidden
        # size); the unchosen experts are zeroed by their gates, the scale folded in here, where
        # the tensor is E*r wide rather than out_features wide.
        hidden = self.dropout(x2) @ self.lora_A.reshape(-1, self.in_features).T.to(x2.dtype)
        if gates is None:
            return hidden * self.scaling
        return hidden * (gates * self.scaling).to(hidden.dtype).repeat_interleave(self.rank, dim=1)

    def _up_weight(self) -> torch.Tensor:
        """All experts' B side by side: [out, E*r]."""
        return self.lora_B.permute(1, 0, 2).reshape(self.out_features, -1)

    def _grouped_delta(self, x2: torch.Tensor) -> torch.Tensor:
        """The delta through the routing kernels: gather, grouped low-rank matmuls, weighted scatter-add."""
        if self.num_experts == 1:
            ids = torch.zeros(x2.shape[0], 1, dtype=torch.long, device=x2.device)
            gates = torch.ones(x2.shape[0], 1, dtype=x2.dtype, device=x2.device)
        else:
            gates, ids = self.routing(x2)
        return ops.moe_lora(self.dropout(x2), self.lora_A.to(x2.dtype), self.lora_B.to(x2.dtype), gates * self.scaling,
                            ids, ids_in_range=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        compute_dtype = _compute_dtype(x)
        if self.kernel_for(x.device.type, compute_dtype) == "grouped":
            delta = self._grouped_delta(x.reshape(-1, self.in_features))
            return self.base(x) + delta.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        weight = self._fusable_base_weight(x, compute_dtype)
        if weight is not None:
            x2 = x.reshape(-1, self.in_features)
            dropped = self.dropout(x2)
            dropped = None if dropped is x2 else dropped
            if self.num_experts == 1:
                out = lora_linear(x2, dropped, weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)
            else:
                out, logits, ids = dense_moe_lora(x2, dropped, weight, self.base.bias, self.router.weight,
                                                  self.lora_A, self.lora_B, self.scaling, self.top_k)
                if self.balance is not None and self.training:
                    self.balance.add(logits, ids)
            return out.reshape(*x.shape[:-1], self.out_features)
        base = self.base(x)
        hidden = self._down(x.reshape(-1, self.in_features)).to(base.dtype)
        # The up-projection accumulates straight into the base output (one GEMM, no extra pass).
        out = torch.addmm(base.reshape(-1, self.out_features), hidden, self._up_weight().T.to(base.dtype))
        return out.reshape(base.shape)

    def _fusable_base_weight(self, x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor | None:
        """The base weight as [out, in] when the dense path (plain LoRA, or experts with this module's own
        router) can run as one autograd function with the base (same math): a plain frozen nn.Linear or
        GPT-2 Conv1D, one dtype throughout, no autocast to another dtype. None otherwise (quantised or
        trainable bases, shared routers, mixed precision over higher-precision weights)."""
        if self.num_experts > 1 and (self.router is None or self.shared_gates is not None or not self.renormalize):
            return None  # (the fused router kernel renormalises the top-k gates)
        base = self.base
        if type(base) is nn.Linear:
            weight = base.weight
        elif type(base).__name__ == "Conv1D":
            weight = base.weight.T
        else:
            return None
        frozen = not weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
        # The adapter's own parameters may be float32 over a half-precision base (adapter_dtype): the function
        # computes in the input's dtype and hands their gradients back in theirs.
        adapter = {self.lora_A.dtype} | ({self.router.weight.dtype} if self.router is not None else set())
        same_dtype = x.dtype == weight.dtype and adapter <= {x.dtype, torch.float32}
        # Mixed precision casts op by op to its own dtype: keep the op chain where that differs from the
        # layer's. A model already in the autocast dtype (`alphalora train --bf16` loads it so) casts nothing.
        return weight if frozen and same_dtype and compute_dtype == x.dtype else None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"top_k={self.top_k}, rank={self.rank}, scaling={self.scaling:g}, kernel={self.kernel}"
                + ("" if self.renormalize else ", renormalize=False") + ("" if self.enabled else ", disabled"))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the products on x run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def moe_lora_loop_reference(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The MoLA-style computation: a Python loop over experts, gather, per-expert LoRA, index_add.

    Kept as the oracle for tests and the peer in benchmarks; no dropout (evaluation semantics).
    """
    x2 = x.reshape(-1, layer.in_features)
    out = torch.zeros(x2.shape[0], layer.out_features, dtype=torch.float32, device=x.device)
    lora_A, lora_B = layer.lora_A.to(x2.dtype), layer.lora_B.to(x2.dtype)
    if layer.num_experts == 1:
        out += (F.linear(F.linear(x2, lora_A[0]), lora_B[0]) * layer.scaling).float()
    else:
        logits = F.linear(x2, layer.router.weight.to(x2.dtype)) if layer.shared_gates is None else None
        if logits is not None:
            gates, ids = top_k_gates(logits, layer.top_k, layer.renormalize)
        else:
            gates, ids = stable_top_k(layer.shared_gates, layer.top_k)
        for e in range(layer.num_experts):
            rows, slot = torch.where(ids == e)
            if rows.numel() == 0:
                continue
            expert = F.linear(F.linear(x2[rows], lora_A[e]), lora_B[e]) * layer.scaling
            out.index_add_(0, rows, (expert.float() * gates[rows, slot, None]))
    return layer.base(x) + out.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)
