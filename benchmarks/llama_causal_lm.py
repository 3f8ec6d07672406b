"""Real run: a small Llama causal LM adapted with MoE-LoRA, its loss measured before and after.

No pretrained Llama installs offline, so the script first pretrains a small Llama (full
training, a byte-level BPE tokenizer trained here) on English: the docstrings of the Python
standard library. Then it analyses that model, allocates experts with AlphaLoRA, and trains a
MoE-LoRA adapter (base frozen) on a new domain: the source code of the `email` package, with
held-out files for the evaluation loss.

    python benchmarks/llama_causal_lm.py --json out.json
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import json
import math
import pkgutil
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import alphalora  # noqa: E402
from alphalora.training import train  # noqa: E402


def stdlib_docstrings(limit: int) -> list[str]:
    """Docstrings of the standard library's top-level pure-Python modules."""
    import importlib

    texts = []
    for info in sorted(pkgutil.iter_modules([sysconfig.get_paths()["stdlib"]]), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in {"antigravity", "this", "tkinter", "turtle", "idlelib"}:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - some modules need a display or a platform
            continue
        for member in vars(module).values():
            doc = inspect.getdoc(member) if callable(member) else None
            if doc and len(doc) > 80:
                texts.append(" ".join(doc.split())[:600])
        if len(texts) >= limit:
            break
    return texts[:limit]


def source_chunks(package: str, lines_per_chunk: int = 12) -> dict[str, list[str]]:
    """The package's source split into chunks of lines, by file."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    chunks = {}
    for path in sorted(root.rglob("*.py")):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        chunks[path.name] = ["\n".join(lines[i:i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]
    return chunks


def build_tokenizer(texts: list[str], folder: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=256)
    fast.save_pretrained(folder)
    return fast


def pretrain(folder: Path, tokenizer, texts: list[str], args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    ids = [tokenizer(t)["input_ids"][:128] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for step in range(args.pretrain_steps):
        batch = [ids[i] for i in torch.randint(len(ids), (args.batch,), generator=generator).tolist()]
        width = max(len(b) for b in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, b in enumerate(batch):
            input_ids[row, :len(b)] = torch.tensor(b)
            labels[row, :len(b)] = torch.tensor(b)
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.pretrain_steps - 1:
            print(f"  pretrain step {step}: loss {loss.item():.3f}")
    model.save_pretrained(folder)


def eval_loss(model_dir: Path, adapter_dir: Path | None, texts: list[str], tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    from alphalora.adapters.io import load_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"][:200]])
            n = ids.shape[1] - 1
            total += model(input_ids=ids, labels=ids).loss.item() * n
            count += n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--pretrain-lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=150, help="MoE-LoRA training steps")
    parser.add_argument("--budget", type=int, default=20, help="experts over all layers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="llama-clm-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # adapters and models: hundreds of MB
    model_dir = work / "base"
    start = time.perf_counter()
    docstrings = stdlib_docstrings(4000)
    chunks = source_chunks("email")
    held_out = {"_header_value_parser.py", "message.py"}
    train_texts = [c for name, cs in chunks.items() if name not in held_out for c in cs]
    eval_texts = [c for name, cs in chunks.items() if name in held_out for c in cs][:120]
    print(f"pretraining corpus: {len(docstrings)} docstrings; adaptation: {len(train_texts)} chunks of email/*.py, "
          f"{len(eval_texts)} held-out chunks")
    tokenizer = build_tokenizer(docstrings + train_texts, model_dir, args.vocab)
    pretrain(model_dir, tokenizer, docstrings, args)
    pretrain_seconds = time.perf_counter() - start

    report = alphalora.analyze(model_dir, progress=False)
    plan = alphalora.allocate(report, budget=args.budget, beta=2.5)
    print(f"layer alphas {[round(a, 2) for a in report.layer_alphas()]} -> experts {plan.experts_per_layer}")
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in train_texts) + "\n")
    before = eval_loss(model_dir, None, eval_texts, tokenizer)
    start = time.perf_counter()
    result = train(model_dir, plan, data, work / "adapter", max_steps=args.steps, learning_rate=2e-3,
                   batch_size=args.batch, logging_steps=10, save_steps=10**6, max_length=256, progress=False)
    train_seconds = time.perf_counter() - start
    after = eval_loss(model_dir, work / "adapter", eval_texts, tokenizer)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    print(f"MoE-LoRA training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps ({train_seconds:.0f} s)")
    print(f"held-out email source: loss {before:.3f} (perplexity {math.exp(before):.1f}) before, "
          f"{after:.3f} (perplexity {math.exp(after):.1f}) after")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": {"layers": args.layers, "hidden": args.hidden, "vocab": len(tokenizer)},
            "pretrain_steps": args.pretrain_steps, "pretrain_seconds": pretrain_seconds,
            "layer_alphas": report.layer_alphas(), "experts_per_layer": plan.experts_per_layer,
            "train_loss_first": losses[0], "train_loss_last": losses[-1], "train_seconds": train_seconds,
            "eval_loss_before": before, "eval_loss_after": after}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
