#!/usr/bin/env python
"""Overhead of routing dense attention through longattn: patched "dense" vs unpatched SDPA, same run.

    python scripts/bench_dense.py --out evals/results/bench_dense.json

Goal (issue 3): at most 3% slower at 4k and 16k tokens on a small Llama. Runs alternate patched and unpatched
forwards so that drift in machine load affects both alike; the median of each is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import longattn


def small_llama(seed: int = 0):
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32768)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), cfg


def timed_forward(model, ids) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)  # the attention stack is what is measured, not the LM head
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="auto", help="dense backend for the patched model")
    ap.add_argument("--out", type=Path, default=Path("evals/results/bench_dense.json"))
    args = ap.parse_args(argv)

    model, cfg = small_llama()
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        for patched in (False, True):  # warm-up (and compile, for the flex backend)
            with (longattn.patched(model, "dense", backend=args.backend) if patched else contextlib.nullcontext()):
                timed_forward(model, ids)
        times = {False: [], True: []}
        for r in range(args.repeats):
            for patched in ((False, True) if r % 2 == 0 else (True, False)):
                with (longattn.patched(model, "dense", backend=args.backend) if patched else contextlib.nullcontext()):
                    times[patched].append(timed_forward(model, ids))
        base, ours = statistics.median(times[False]), statistics.median(times[True])
        row = {"seq_len": length, "unpatched_sdpa_s": round(base, 4), "patched_dense_s": round(ours, 4),
               "ratio": round(ours / base, 4), "overhead_pct": round(100 * (ours / base - 1), 2),
               "all_unpatched_s": [round(t, 4) for t in times[False]],
               "all_patched_s": [round(t, 4) for t in times[True]]}
        print(json.dumps({k: row[k] for k in ("seq_len", "unpatched_sdpa_s", "patched_dense_s", "overhead_pct")}))
        results.append(row)
    report = {
        "benchmark": "dense_overhead", "goal": "overhead_pct <= 3", "backend": args.backend,
        "model": {"arch": "LlamaForCausalLM", "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                  "heads": cfg.num_attention_heads, "dtype": "float32", "batch": 1},
        "repeats": args.repeats, "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, "
                   f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
