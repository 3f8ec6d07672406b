"""Real run: HeteroLoRA on all-MiniLM-L6-v2 (real weights), the 16-class standard-library docstring task.

At one trainable-parameter budget (uniform rank-2 LoRA on every q, k, v, o, up, down), compares
uniform rank with HeteroLoRA static and dynamic, for grad-norm and for the best other proxy (every
other proxy, constant included, is screened statically on the first seed), and with --shortcuts
static grad-norm with shortcut connections; reports mean and standard deviation of test accuracy
over the seeds and the wall-time overhead of dynamic re-scoring.

    python benchmarks/minilm_hetero.py --seeds 0,1,2,3,4 --shortcuts --json benchmarks/minilm_hetero_5seeds_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from minilm_classification import MODULES, accuracy, prepare_task  # noqa: E402

import alphalora  # noqa: E402
from alphalora.allocation.hetero import allocate_hetero  # noqa: E402
from alphalora.training import train  # noqa: E402

STATIC_PROXIES = ("constant", "grad-norm", "snip", "synflow", "fisher", "alpha")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--uniform-rank", type=int, default=2, help="sets the budget: uniform LoRA at this rank")
    parser.add_argument("--rank", type=int, default=8, help="HeteroLoRA's candidate rank (the paper: 8)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--proxy-batches", type=int, default=8)
    parser.add_argument("--proxy-batch-size", type=int, default=8)
    parser.add_argument("--dynamic-every", type=int, default=5, help="optimizer steps between re-scorings")
    parser.add_argument("--shortcuts", action="store_true", help="also run static grad-norm with shortcut connections")
    parser.add_argument("--rows", default=None, help="run only these rows (comma-separated names), e.g. to time "
                        "'static grad-norm,dynamic grad-norm' on a quiet machine")
    parser.add_argument("--best-other", default=None, help="skip the screening and use this proxy")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir, work, data, train_rows, test_rows = prepare_task("minilm-hetero-")
    seeds = [int(s) for s in args.seeds.split(",")]

    report = alphalora.analyze(model_dir, progress=False)
    uniform = alphalora.allocate(report, method="uniform", budget=len(report.layers), top_k=1, rank=args.uniform_rank)
    dims = {m.name: m.shape for m in report.matrices if m.layer is not None}
    budget = args.uniform_rank * sum(out + inp for out, inp in dims.values())
    print(f"budget: {budget} trainable adapter parameters (uniform rank {args.uniform_rank} on {len(dims)} modules)")

    def hetero(proxy: str, seed: int, **options):
        return allocate_hetero(model_dir, data, proxy=proxy, budget=budget, task="classification", ranks=[args.rank],
                               proxy_batches=args.proxy_batches, proxy_batch_size=args.proxy_batch_size, seed=seed,
                               progress=False, **options)

    results: dict[str, dict] = {}

    def run(name: str, make_plan, run_seeds=seeds) -> None:
        if args.rows and name not in args.rows.split(","):
            return
        earlier = results.get(name, {"accuracy": [], "seeds": [], "parameters": [], "seconds": [], "rescoring": []})
        scores, seconds, rescoring = earlier["accuracy"], earlier["seconds"], earlier["rescoring"]
        parameters, done = earlier["parameters"], earlier["seeds"]
        for seed in [s for s in run_seeds if s not in done]:
            done.append(seed)
            plan = make_plan(seed)
            parameters.append(plan.source.get("parameters", budget))
            out = work / f"{name.replace(' ', '_')}-{seed}"
            start = time.perf_counter()
            result = train(model_dir, plan, data, out, task="classification", epochs=args.epochs,
                           learning_rate=args.lr, batch_size=args.batch_size, seed=seed, save_steps=10**6,
                           logging_steps=10, progress=False)
            seconds.append(time.perf_counter() - start)
            rescoring.append(sum(r["seconds"] for r in result.reallocations))
            scores.append(accuracy(model_dir, out, test_rows, result.label_names))
            print(f"  {name:28s} seed {seed}: accuracy {scores[-1]:.4f}, {parameters[-1]} params, "
                  f"train {seconds[-1]:.0f} s (re-scoring {rescoring[-1]:.1f} s)", flush=True)
        results[name] = {"accuracy": scores, "seeds": done, "mean": statistics.fmean(scores),
                         "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "parameters": parameters,
                         "seconds": seconds, "rescoring": rescoring, "train_seconds": statistics.fmean(seconds),
                         "rescoring_seconds": statistics.fmean(rescoring)}

    run(f"uniform rank {args.uniform_rank}", lambda seed: uniform)
    run("static grad-norm", lambda seed: hetero("grad-norm", seed))
    # Screening: every other proxy on the first seed; the best then gets all seeds, static and dynamic.
    others = [p for p in STATIC_PROXIES if p != "grad-norm"]
    for proxy in others:
        run(f"static {proxy}", lambda seed, proxy=proxy: hetero(proxy, seed), seeds[:1])
    best_other = args.best_other or max((p for p in others if p != "constant"),
                                        key=lambda p: results[f"static {p}"]["mean"])
    run(f"static {best_other}", lambda seed: hetero(best_other, seed))
    for proxy in ("grad-norm", best_other):
        run(f"dynamic {proxy}", lambda seed, proxy=proxy: hetero(proxy, seed, dynamic_every=args.dynamic_every))
    if args.shortcuts:
        run("static grad-norm + shortcuts", lambda seed: hetero("grad-norm", seed, shortcuts=True))

    static_seconds = results.get("static grad-norm", {}).get("train_seconds", float("nan"))
    print(f"\nbudget {budget} parameters; {len(seeds)} seeds; candidate rank {args.rank} (uniform: rank "
          f"{args.uniform_rank})")
    print(f"{'plan':30s} accuracy mean +- std    train s   re-scoring s")
    for name, r in results.items():
        print(f"{name:30s} {r['mean']:.4f} +- {r['std']:.4f}   {r['train_seconds']:7.1f}   "
              f"{r['rescoring_seconds']:6.1f}")
    for proxy in (p for p in ("grad-norm", best_other) if f"dynamic {p}" in results):
        dynamic = results[f"dynamic {proxy}"]
        print(f"dynamic {proxy}: re-scoring {dynamic['rescoring_seconds']:.1f} s, wall time "
              f"{dynamic['train_seconds'] / static_seconds:.2f}x static grad-norm's")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "task": {"modules": MODULES, "train": len(train_rows), "test": len(test_rows)}, "budget": budget,
            "rank": args.rank, "uniform_rank": args.uniform_rank, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "proxy_batches": args.proxy_batches,
            "proxy_batch_size": args.proxy_batch_size, "dynamic_every": args.dynamic_every, "seeds": seeds,
            "best_other_proxy": best_other, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
