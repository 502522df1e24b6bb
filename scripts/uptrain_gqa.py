#!/usr/bin/env python
"""Grouped-query uptraining of the reference model: convert its 4 KV heads to g (mean-pooled, Ainslie et al.
2023, arXiv:2305.13245), optionally attend with KDGQA / DGQA (Khan et al. 2024, arXiv:2408.08454), fine-tune
briefly on the reference model's own training mix, and measure held-out perplexity before conversion, after
it and after uptraining, with the KV-cache bytes per token.

    PYTHONPATH=. python scripts/uptrain_gqa.py                       # every row, ~20-25 min on 2 busy CPU cores
    PYTHONPATH=. python scripts/uptrain_gqa.py --rows g2 --steps 20  # a quick look

Each finished row is appended to evals/results/gqa/results.jsonl at once (a row already there is skipped, so
an interrupted run loses nothing), and report.md is rewritten from that file. Seeded: row data depends only
on (seed, step). The "g4 fine-tune" row trains the unconverted model the same way, so that the effect of
more training on this data is not credited to conversion.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import longattn
from longattn.evals.perplexity import sliding_window_perplexity
from longattn.evals.texts import load_text

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "evals" / "results" / "gqa"

# name -> (KV heads, attention method or None, extra method parameters)
ROWS = {
    "g4-finetune": (4, None, {}),
    "g2": (2, None, {}),
    "g1": (1, None, {}),
    "g2-kdgqa": (2, "kdgqa", {}),
    "g2-dgqa": (2, "dgqa", {"kind": "ema", "beta": 0.9, "window": 1}),
    # Not a conversion: SSA's temperatures (Zhang et al. 2024) added to the unconverted model and trained
    # alone (everything else frozen), to compare with g4-finetune, which trains everything.
    "g4-ssa": (4, "ssa", {}),
}


def training_module():
    """scripts/train_reference_model.py as a module: its corpus split, document mix and weighted loss."""
    spec = importlib.util.spec_from_file_location("train_reference_model", ROOT / "scripts" / "train_reference_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def heldout_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(load_text("linux-doc-heldout"), return_tensors="pt").input_ids[0]
    return ids[:n_tokens]


def perplexity(model, ids, context: int) -> float:
    model.eval()
    return round(sliding_window_perplexity(model, ids, context=context, stride=context).perplexity, 3)


def uptrain(model, maker, train, steps: int, length: int, tokens_per_step: int, lr: float, seed: int) -> float:
    """AdamW with warm-up and cosine decay on the reference mix (bf16 autocast, as the reference training)."""
    cfg = train.TrainConfig(seed=seed, steps=steps, lr=lr, warmup_steps=max(1, steps // 10), lengths=(length,))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        # The maker's seed (default 1) differs from the reference run's (0): these batches are new draws.
        toks, w = maker.batch(step, length, tokens_per_step // length)
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, cfg)
        loss = train.weighted_loss(model, toks, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    model.eval()
    return time.time() - t0


def write_report(rows: list[dict], out: Path) -> None:
    lines = [
        "# Grouped-query uptraining of the reference model",
        "",
        "Reference model (4-layer Llama, 4 query heads, head dim 64) converted to g KV heads by mean-pooling,"
        " optionally with KDGQA / DGQA attention, then fine-tuned on its training mix"
        f" ({rows[0]['steps']} steps x {rows[0]['tokens_per_step']} tokens at length {rows[0]['length']},"
        f" lr {rows[0]['lr']}, bf16 autocast, seed {rows[0]['seed']})."
        f" Perplexity: linux-doc held-out, first {rows[0]['eval_tokens']} tokens, windows of"
        f" {rows[0]['context']} tokens. KV bytes: per token, all layers, fp32 (bf16 is half)."
        " Produced by `scripts/uptrain_gqa.py`.",
        "",
        "| row | query heads | KV heads | method | KV bytes/token | ppl before conversion | ppl after conversion "
        "| ppl uptrained | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = "mha" if r["kv_heads"] == r["query_heads"] else "mqa" if r["kv_heads"] == 1 else "gqa"
        lines.append(f"| {r['row']} | {r['query_heads']} | {r['kv_heads']} | {r['method'] or kind} | "
                     f"{r['kv_bytes_per_token']} | {r['ppl_before']} | {r['ppl_after_conversion']} | "
                     f"{r['ppl_uptrained']} | {r['train_seconds']} |")
    dg = [r for r in rows if r.get("dgqa_allocation")]
    for r in dg:
        lines += ["", f"DGQA allocation after uptraining ({r['row']}): query heads per KV head, per layer: "
                  f"{r['dgqa_allocation']}"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache/longattn")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []

    from tokenizers import Tokenizer

    train = training_module()
    tok_path = longattn.reference_model_path() / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    train_path, _ = train.split_corpus(args.cache)
    run_dir = ROOT / "runs" / "uptrain_gqa"
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus = train.encode_corpus(tok, train_path, run_dir / "train_tokens.npy")
    words = train.key_words(train_path.read_text())
    maker = train.DocumentMaker(tok, corpus, words, train.TrainConfig(seed=args.seed))

    model, tokenizer = longattn.reference_model()
    ids = heldout_ids(tokenizer, args.eval_tokens)
    ppl_before = perplexity(model, ids, args.context)
    print(f"reference model: ppl {ppl_before}", file=sys.stderr)

    for name in args.rows:
        if any(r["row"] == name for r in done):
            print(f"{name}: already in {results}, skipped", file=sys.stderr)
            continue
        kv_heads, method, params = ROWS[name]
        torch.manual_seed(args.seed)
        model, _ = longattn.reference_model()
        longattn.convert_to_gqa(model, kv_heads)
        if method == "ssa":
            longattn.add_selective_attention(model, **params)
            for name_, p in model.named_parameters():
                p.requires_grad_(".ssa_temperature." in name_)
        elif method:
            longattn.patch(model, method, **params)
        ppl_after = perplexity(model, ids, args.context)
        print(f"{name}: after conversion ppl {ppl_after}; uptraining", file=sys.stderr)
        seconds = uptrain(model, maker, train, args.steps, args.length, args.tokens_per_step, args.lr, args.seed)
        row = {
            "row": name, "query_heads": model.config.num_attention_heads, "kv_heads": kv_heads, "method": method,
            "method_params": params, "kv_bytes_per_token": longattn.kv_cache_bytes_per_token(model.config),
            "kv_bytes_per_token_bf16": longattn.kv_cache_bytes_per_token(model.config, torch.bfloat16),
            "ppl_before": ppl_before, "ppl_after_conversion": ppl_after,
            "ppl_uptrained": perplexity(model, ids, args.context), "train_seconds": round(seconds, 1),
            "steps": args.steps, "length": args.length, "tokens_per_step": args.tokens_per_step, "lr": args.lr,
            "seed": args.seed, "eval_tokens": int(ids.numel()), "context": args.context,
        }
        if method == "ssa":
            row["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row["ssa_parameters"] = longattn.selective_parameter_count(model)
        if method == "dgqa":
            row["dgqa_allocation"] = [m._longattn_dgqa["counts"].tolist()
                                      for m in longattn.models.attention_modules(model)]
        print(json.dumps(row), file=sys.stderr)
        with open(results, "a") as f:  # one line per finished row: an interruption loses only the current row
            f.write(json.dumps(row) + "\n")
        done.append(row)
        order = {n: i for i, n in enumerate(ROWS)}
        write_report(sorted(done, key=lambda r: order.get(r["row"], math.inf)), args.out)


if __name__ == "__main__":
    main()
