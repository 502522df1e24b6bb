"""Decode speed of sparse attention methods at a long context, against the unpatched model in the same run.

A prompt of each length is prefilled once per configuration, then `--steps` tokens are decoded one at a time
(only decoding is timed). Configurations: the unpatched model (baseline); block_topk (Quest) with the block
metadata kept in the cache that generate-style decoding gets (`patch` installs it), and with a plain DynamicCache
(the metadata recomputed from every key at each step, what Quest avoids); sink_window at the same number of keys.
JSON output.

    python scripts/bench_decode.py --model smollm2-135m-instruct --lengths 4096 --top-k 8 \\
        --out evals/results/bench_decode_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import longattn
from longattn.evals.runner import versions
from longattn.kvcache.quest import BlockBoundsLayer


def decode_ms(model, prompt, steps: int, plain_cache: bool) -> float:
    with torch.no_grad():
        kwargs = dict(cache=DynamicCache(config=model.config)) if plain_cache else {}
        out = model(prompt, use_cache=True, **kwargs)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
    if not plain_cache and longattn.patch_state(model) is not None and \
            longattn.patch_state(model).method.name == "block_topk":
        assert any(isinstance(layer, BlockBoundsLayer) for layer in cache.layers)
    return 1000 * seconds / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("evals/results/bench_decode.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = longattn.load_model(args.model, dtype=args.dtype, device="cpu")
    vocab = min(model.config.get_text_config().vocab_size, 32000)
    keys = args.block_size * args.top_k
    configs = [("unpatched", None, {}, False),
               ("block_topk, metadata in the cache", "block_topk",
                dict(block_size=args.block_size, top_k=args.top_k), False),
               ("block_topk, metadata from the keys", "block_topk",
                dict(block_size=args.block_size, top_k=args.top_k), True),
               ("sink_window, same keys", "sink_window", dict(sink_tokens=4, window=keys - 4), False)]
    rows = []
    for length in args.lengths:
        prompt = torch.randint(5, vocab, (1, length), generator=torch.Generator().manual_seed(0))
        base = None
        for label, method, params, plain in configs:
            if method is not None:
                longattn.patch(model, method, **params)
            ms = decode_ms(model, prompt, args.steps, plain)
            longattn.unpatch(model)
            base = ms if base is None else base
            rows.append(dict(length=length, config=label, method=method, params=params, ms_per_token=ms,
                             speedup=base / ms))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(model=args.model, dtype=args.dtype, steps=args.steps, threads=torch.get_num_threads(),
                  versions=versions(), rows=rows, baseline="the unpatched model with its DynamicCache, same run",
                  goal="block_topk decode at 32k with 1/8 of the blocks (reference model) >= 3x dense decode")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
