"""Decode throughput and KV-cache memory: full cache vs compressed caches at budget = context / 8.

For each context length, the reference model (patched with dense attention) prefills a batch of prompts, then
decodes `--steps` tokens one at a time; the timed part is the decoding only. The full cache is transformers'
DynamicCache; each policy gets a CompressedCache with kv_budget = context / 8 (bounded while decoding). Reports
tokens/s, the ratio to the full cache measured in the same run, and the cache bytes after decoding (which must
stay within budget x layers x KV heads x head dim x 2 x bytes). JSON output.

    python scripts/bench_kvcache.py --lengths 8192 16384 --out evals/results/bench_kvcache.json
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


def decode(model, cache, prompt: torch.Tensor, steps: int) -> tuple[float, int]:
    """(decode tokens/s over the batch, cache bytes after decoding)."""
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits[:, -1:]
        token = logits.argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
    return prompt.shape[0] * steps / seconds, cache_bytes(cache)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--policies", nargs="+", default=["streaming_llm", "snapkv", "h2o", "tova", "knorm"])
    ap.add_argument("--out", type=Path, default=Path("evals/results/bench_kvcache.json"))
    args = ap.parse_args(argv)
    model, _ = longattn.reference_model()
    model.eval()
    cfg = model.config
    entry_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    rows = []
    for length in args.lengths:
        prompt = torch.randint(5, cfg.vocab_size, (args.batch, length), generator=torch.Generator().manual_seed(0))
        budget = length // 8
        longattn.patch(model, "dense")
        full_tps, full_bytes = decode(model, DynamicCache(config=cfg), prompt, args.steps)
        rows.append(dict(length=length, policy="full", kv_budget=None, tokens_per_s=full_tps, cache_bytes=full_bytes,
                         speedup=1.0))
        print(json.dumps(rows[-1]), flush=True)
        for name in args.policies:
            params = dict(sink_tokens=4, kv_budget=budget) if name == "streaming_llm" else dict(kv_budget=budget)
            longattn.patch(model, name, **params)
            cache = CompressedCache(make_policy(name, **params), model)
            tps, held = decode(model, cache, prompt, args.steps)
            limit = args.batch * budget * entry_bytes
            rows.append(dict(length=length, policy=name, kv_budget=budget, tokens_per_s=tps, cache_bytes=held,
                             budget_bytes=limit, within_budget=held <= limit, speedup=tps / full_tps,
                             memory_ratio=held / full_bytes))
            print(json.dumps(rows[-1]), flush=True)
        longattn.unpatch(model)
    result = dict(model="longattn reference model (4 layers, 4 KV heads x 64, fp32)", batch=args.batch,
                  decode_steps=args.steps, threads=torch.get_num_threads(), versions=versions(), rows=rows,
                  goal="decode tokens/s >= 4x the full cache at 16k with budget 1/8, cache bytes <= budget")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
