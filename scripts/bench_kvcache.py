"""Decode speed and KV-cache memory: the full cache vs compressed caches, on any model longattn loads.

For each context length a prompt is prefilled, then `--steps` tokens are decoded one at a time; only decoding is
timed (wall time and process CPU time per token). The baseline is the unpatched model with transformers'
DynamicCache, measured in the same run; each policy runs patched with its budget (default context / 8, bounded
while decoding), once per `--evict-every` value. Reports ms/token, the ratio to the full cache, and the cache
bytes after decoding (which must stay within budget x layers x KV heads x head dim x 2 x bytes). JSON output.

    python scripts/bench_kvcache.py --lengths 8192 16384 --out evals/results/bench_kvcache.json
    python scripts/bench_kvcache.py --model smollm2-135m-instruct --lengths 4096 --budget 512 --batch 1 \\
        --evict-every 1 16 --out evals/results/bench_kvcache_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import longattn
from longattn.evals.runner import cache_bytes, versions
from longattn.kvcache import CompressedCache, make_policy


def decode(model, cache, prompt: torch.Tensor, steps: int) -> dict:
    """ms per decoded token (wall and process CPU time, per sequence step) and cache bytes after decoding."""
    with torch.no_grad():
        token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(ms_per_token=1000 * wall / steps, cpu_ms_per_token=1000 * cpu / steps, cache_bytes=cache_bytes(cache))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference", help="a name of `longattn models` or an HF folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--budget", type=int, default=None, help="kv_budget (default: length / 8)")
    ap.add_argument("--compression-ratio", type=float, default=None,
                    help="instead of a budget: evict this fraction of the prompt once, then decode freely (kvpress's "
                         "protocol)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--policies", nargs="+", default=["streaming_llm", "snapkv", "h2o", "tova", "knorm"])
    ap.add_argument("--evict-every", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("evals/results/bench_kvcache.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = longattn.load_model(args.model, dtype=args.dtype, device="cpu")
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    entry_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    rows = []
    for length in args.lengths:
        vocab = min(cfg.vocab_size, 32000)
        prompt = torch.randint(5, vocab, (args.batch, length), generator=torch.Generator().manual_seed(0))
        budget = args.budget or length // 8
        full = decode(model, DynamicCache(config=model.config), prompt, args.steps)
        rows.append(dict(length=length, policy="full", kv_budget=None, **full, speedup=1.0))
        print(json.dumps(rows[-1]), flush=True)
        for name in args.policies:
            for every in args.evict_every if args.compression_ratio is None else [1]:
                params = dict(kv_budget=budget, evict_every=every) if args.compression_ratio is None else \
                    dict(compression_ratio=args.compression_ratio)
                if name == "streaming_llm":
                    params["sink_tokens"] = 4
                longattn.patch(model, name, **params)
                got = decode(model, CompressedCache(make_policy(name, **params), model), prompt, args.steps)
                longattn.unpatch(model)
                # (with a compression ratio, decoding grows the cache: no budget to hold)
                limit = args.batch * budget * entry_bytes if args.compression_ratio is None else None
                rows.append(dict(length=length, policy=name, **params, **got,
                                 budget_bytes=limit,
                                 within_budget=None if limit is None else got["cache_bytes"] <= limit,
                                 speedup=full["ms_per_token"] / got["ms_per_token"],
                                 memory_ratio=got["cache_bytes"] / full["cache_bytes"]))
                print(json.dumps(rows[-1]), flush=True)
    result = dict(model=args.model, dtype=args.dtype, batch=args.batch, decode_steps=args.steps,
                  threads=torch.get_num_threads(), versions=versions(), rows=rows,
                  baseline="the unpatched model with transformers' DynamicCache, same run",
                  goal="no policy slower than the full cache; at 16k with budget 1/8 >= 7x the full cache")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
