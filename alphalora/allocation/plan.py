"""The adapter plan: how many LoRA experts each layer gets, where, at which rank. JSON on disk."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from alphalora._io import check_format_version, read_json, write_text_atomic
from alphalora._numbers import is_number, is_positive_int, is_positive_number
from alphalora.spectral.report import ENTRIES as REPORT_ENTRIES

FORMAT_VERSION = 1
METHODS = ("alphalora", "mola", "uniform", "hetero")
DEFAULT_TARGET_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
ROUTER_TYPES = ("per_module", "shared")
SHORTCUT_KINDS = ("residual1", "residual2", "shortcut1", "shortcut2")
PROXY_NAMES = ("constant", "grad-norm", "snip", "synflow", "fisher", "alpha")
POOLS = ("joint", "separate")
UNCHANGING_PROXIES = ("constant", "alpha")  # the same scores every round: nothing for dynamic re-selection to do
# The field that marks a plan: the analysis report's reader refuses a file with it as "an adapter plan, not an
# analysis report", and a file without it is checked here for the other JSON files people pass for a plan.
PLAN_MARK = "experts_per_layer"


def shortcut_name(layer: int, kind: str) -> str:
    """The plan name of a shortcut connection, e.g. "layer3.residual1"."""
    return f"layer{layer}.{kind}"


def parse_shortcut(name: str) -> tuple[int, str] | None:
    """(layer, kind) of a shortcut's plan name, or None when `name` is not one (e.g. a module name)."""
    layer, _, kind = name.partition(".")
    if layer.startswith("layer") and layer[5:].isdigit() and kind in SHORTCUT_KINDS:
        return int(layer[5:]), kind
    return None


def all_shortcut_names(num_layers: int) -> list[str]:
    """Every shortcut candidate of a model with `num_layers` blocks (4L - 1 of them)."""
    return [shortcut_name(layer, kind) for layer in range(num_layers) for kind in SHORTCUT_KINDS
            if not (layer == 0 and kind == "shortcut2")]


class PlanFormatError(ValueError):
    """A plan that is not valid: the message names the field and the fix."""


@dataclass
class RouterSettings:
    """Token-level softmax top-k routers (MoLA): one per adapted module, or one shared per layer."""

    type: str = "per_module"
    aux_loss_coef: float = 0.0  # Switch-style load balancing; MoLA's paper runs use 0.001
    # True: the top-k gates rescaled to sum to 1 (MoLA). False: the chosen experts' softmax probabilities
    # as they are (honoured in training; both serving engines renormalise, so they refuse such adapters).
    renormalize: bool = True


@dataclass
class Reallocation:
    """Dynamic HeteroLoRA: every `every` steps all candidates are re-scored and the best kept."""

    every: int
    proxy: str = "grad-norm"
    budget: int = 0  # adapter parameters enabled at a time
    batches: int = 32  # proxy minibatches: the first `batches` of the training set, unshuffled
    batch_size: int = 8
    pools: str = "joint"
    shortcut_share: float | None = None  # budget share of the shortcut pool when pools == "separate"
    seed: int = 0  # tie-break and probe-perturbation seed


def _settings(kind: type, value: Any, name: str, example: str) -> Any:
    """A settings object from its JSON form (an object), with a clear error for anything else."""
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        raise PlanFormatError(f"invalid plan: {name} must be an object such as {example}, got {value!r}")
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise PlanFormatError(f"invalid plan: {name} has unknown fields {unknown}; its fields are {sorted(known)}")
    try:
        return kind(**value)
    except TypeError as error:  # a required field missing
        raise PlanFormatError(f"invalid plan: {name}: {error}") from error


@dataclass
class Plan:
    """An adapter plan, produced by `allocate` and consumed by training."""

    method: str
    base_model: str
    experts_per_layer: list[int]
    top_k_per_layer: list[int]
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    rank: int = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)  # role, name or glob -> rank (heterogeneous LoRA)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    router: RouterSettings = field(default_factory=RouterSettings)
    modules_to_save: list[str] = field(default_factory=list)  # trained in full, e.g. a classifier head
    shortcuts: dict[str, int] = field(default_factory=dict)  # "layer3.residual1" -> rank (HeteroLoRA)
    shortcut_alpha: float = 4.0  # shortcut scaling = shortcut_alpha / rank (the HeteroLoRA authors' 4)
    disabled_modules: list[str] = field(default_factory=list)  # built but switched off (dynamic HeteroLoRA)
    reallocation: Reallocation | None = None
    source: dict[str, Any] = field(default_factory=dict)  # how the counts were derived

    def __post_init__(self) -> None:
        self.router = _settings(RouterSettings, self.router, "router", '{"type": "shared", "aux_loss_coef": 0.001}')
        if self.reallocation is not None:
            self.reallocation = _settings(Reallocation, self.reallocation, "reallocation",
                                          '{"every": 10, "budget": 100000}')
        self.validate()

    @property
    def num_layers(self) -> int:
        return len(self.experts_per_layer)

    @property
    def total_experts(self) -> int:
        return sum(self.experts_per_layer)

    def validate(self) -> None:
        """Raises PlanFormatError naming the first problem."""
        def fail(message: str) -> None:
            raise PlanFormatError(f"invalid plan: {message}")

        if self.method not in METHODS:
            fail(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        counts, top_k = self.experts_per_layer, self.top_k_per_layer
        if not isinstance(counts, list) or not counts or not all(is_positive_int(n) for n in counts):
            fail(f"experts_per_layer must be a non-empty list of integers >= 1, got {counts!r}")
        if not isinstance(top_k, list) or len(top_k) != len(counts):
            fail(f"top_k_per_layer must have one entry per layer ({len(counts)}), got {top_k!r}")
        for layer, (n, k) in enumerate(zip(counts, top_k, strict=True)):
            if not is_positive_int(k) or not k <= n:
                fail(f"layer {layer}: top_k {k!r} must be between 1 and its {n} experts")
        shortcuts_only = self.method == "hetero" and bool(self.shortcuts)
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) and t for t in self.target_modules) \
                or not (self.target_modules or shortcuts_only):
            fail(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if not is_positive_int(self.rank):
            fail(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.base_model, str):
            fail(f"base_model must be the model's name or folder (a string), got {self.base_model!r}")
        if not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) and m for m in
                                                                 self.modules_to_save):
            fail(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if not isinstance(self.rank_pattern, dict) or not all(
            isinstance(k, str) and is_positive_int(v) for k, v in self.rank_pattern.items()
        ):
            fail(f"rank_pattern must map module roles/names to positive integers, got {self.rank_pattern!r}")
        if not is_positive_number(self.lora_alpha):
            fail(f"lora_alpha must be positive and finite, got {self.lora_alpha!r}")
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            fail(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.router.type not in ROUTER_TYPES:
            fail(f"router.type {self.router.type!r} is not one of {', '.join(ROUTER_TYPES)}")
        coef = self.router.aux_loss_coef
        if not is_number(coef) or not coef >= 0:
            fail(f"router.aux_loss_coef must be a number >= 0, got {coef!r}")
        if not isinstance(self.router.renormalize, bool):
            fail(f"router.renormalize must be true or false, got {self.router.renormalize!r}")
        self._validate_hetero(fail)

    def _validate_hetero(self, fail) -> None:
        if not isinstance(self.shortcuts, dict):
            fail(f'shortcuts must map shortcut names to ranks, e.g. {{"layer1.residual1": 8}}, got {self.shortcuts!r}')
        if self.shortcuts and self.method != "hetero":
            fail(f"shortcuts are HeteroLoRA's: a plan with method {self.method} cannot have them; remove shortcuts, "
                 "or allocate with --method hetero --shortcuts")
        for name, rank in self.shortcuts.items():
            parsed = parse_shortcut(name) if isinstance(name, str) else None
            if parsed is None:
                fail(f"shortcut {name!r} must be layer<N>.<kind> with kind one of {', '.join(SHORTCUT_KINDS)}")
            layer, kind = parsed
            if layer >= self.num_layers or (kind == "shortcut2" and layer == 0):
                fail(f"shortcut {name!r} does not exist in a {self.num_layers}-layer model")
            if not is_positive_int(rank):
                fail(f"shortcut {name!r}: rank must be a positive integer, got {rank!r}")
        if not is_positive_number(self.shortcut_alpha):
            fail(f"shortcut_alpha must be positive and finite, got {self.shortcut_alpha!r}")
        if not isinstance(self.disabled_modules, list) or not all(isinstance(n, str) for n in self.disabled_modules):
            fail(f"disabled_modules must be a list of module names, got {self.disabled_modules!r}")
        repeated = sorted({n for n in self.disabled_modules if self.disabled_modules.count(n) > 1})
        if repeated:
            fail(f"disabled_modules lists {repeated} more than once; list each module once")
        if self.reallocation is not None:
            self._validate_reallocation(fail)

    def _validate_reallocation(self, fail) -> None:
        dynamic = self.reallocation
        if self.method != "hetero" or any(n != 1 for n in self.experts_per_layer):
            fail(f"reallocation (dynamic HeteroLoRA) switches plain LoRA modules on and off: it needs method hetero "
                 f"and one expert per layer, not method {self.method} with experts_per_layer "
                 f"{self.experts_per_layer}; remove reallocation, or allocate with --method hetero --dynamic-every")
        if self.rank_pattern or any(rank != self.rank for rank in self.shortcuts.values()):
            fail(f"reallocation re-selects every candidate at the plan's rank {self.rank}: rank_pattern must be empty "
                 "and every shortcut at that rank (allocate with --dynamic-every and a single --ranks value)")
        wanted = {"every": "a positive number of steps", "budget": "a positive parameter count",
                  "batches": "a positive number of minibatches", "batch_size": "a positive number of examples"}
        for name, what in wanted.items():
            value = getattr(dynamic, name)
            if not is_positive_int(value):
                fail(f"reallocation.{name} must be {what}, got {value!r}")
        if dynamic.proxy not in PROXY_NAMES:
            fail(f"reallocation.proxy {dynamic.proxy!r} is not one of {', '.join(PROXY_NAMES)}")
        if dynamic.proxy in UNCHANGING_PROXIES:
            fail(f"reallocation.proxy {dynamic.proxy!r} scores every round the same, so re-selecting never changes "
                 f"the selection; use one of {', '.join(p for p in PROXY_NAMES if p not in UNCHANGING_PROXIES)}, or "
                 "remove reallocation for a static plan")
        if dynamic.pools not in POOLS:
            fail(f"reallocation.pools {dynamic.pools!r} is not one of {', '.join(POOLS)}")
        share = dynamic.shortcut_share
        if share is not None and not (is_number(share) and 0 <= share <= 1):
            fail(f"reallocation.shortcut_share must be a number between 0 and 1 (or null: the shortcuts' share of "
                 f"all candidates), got {share!r}")
        if isinstance(dynamic.seed, bool) or not isinstance(dynamic.seed, int):
            fail(f"reallocation.seed must be an integer, got {dynamic.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        """Standard JSON; NaN or Inf anywhere (JSON has no words for them) is refused rather than written."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> Plan:
        """A plan from its JSON form; `source`, the file it was read from, is named where it is some other file."""
        mix_up = not_a_plan(data, source)
        if mix_up:
            raise PlanFormatError(mix_up)
        check_format_version(data, FORMAT_VERSION, "plan", "`alphalora allocate`", PlanFormatError)
        values = {k: v for k, v in data.items() if k != "format_version"}
        try:
            return cls(**values)
        except TypeError as error:
            raise PlanFormatError(f"invalid plan: {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        if Path(path).is_dir():
            raise PlanFormatError(_folder_passed_for_a_plan(Path(path)))
        return cls.from_dict(read_json(path, "plan", "`alphalora allocate`", PlanFormatError), source=path)


def not_a_plan(data: Any, source: str | Path | None = None) -> str | None:
    """What other known JSON file `data` is (an analysis report, an adapter's config, a PEFT adapter config, a
    model config), said with what to pass instead; None where it may be a plan (validation names its problems).

    `source` is the file's path, named in the message ("this" without one)."""
    if not isinstance(data, dict) or PLAN_MARK in data:
        return None
    this = str(source) if source is not None else "this"
    if all(key in data for key in REPORT_ENTRIES):
        report = shlex.quote(str(source)) if source is not None else "REPORT.json"
        return (f"{this} is an analysis report (from `alphalora analyze`), not an adapter plan; make a plan from it "
                f"with `alphalora allocate --report {report} --out plan.json` and pass that")
    if isinstance(data.get("plan"), dict) and "module_names" in data:
        return (f"{this} is a trained adapter's config (written by `alphalora train`), not an adapter plan; pass the "
                "plan it was trained from (the config keeps a copy under \"plan\"), or make one with "
                "`alphalora allocate`")
    if "peft_type" in data:
        rank = data.get("r") if is_positive_int(data.get("r")) else "R"
        return (f"{this} is a PEFT adapter's config, not an alphalora adapter plan; make a plan "
                f"with `alphalora allocate`, e.g. `alphalora allocate --method uniform --num-layers N --budget N "
                f"--rank {rank}` for one LoRA expert per layer of an N-layer model (plain LoRA)")
    if "model_type" in data or "architectures" in data:
        return (f"{this} is a transformers model's config, not an adapter plan; pass its folder as the model to "
                "train and a plan from `alphalora allocate` as the plan")
    return None


def _folder_passed_for_a_plan(folder: Path) -> str:
    from alphalora.adapters.io import CONFIG_NAME  # (which imports this module)

    if (folder / CONFIG_NAME).exists():
        return (f"{folder} is a trained adapter's folder (from `alphalora train`), not an adapter plan; pass the plan "
                f"JSON it was trained from (its {CONFIG_NAME} keeps a copy under \"plan\"), or make one with "
                "`alphalora allocate`")
    return f"plan {folder} is a folder; pass the plan JSON file `alphalora allocate` wrote (--out, default plan.json)"
