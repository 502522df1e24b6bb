"""Whole-model prefill time of every sparse method at a matched density, against the unpatched model in the same run.

For each length, one forward pass over a prompt (no cache) is timed for: the unpatched model (transformers'
SDPA, the baseline), the model with attention that does nothing (its output is zeros: what the rest of the model
costs, so that the share of attention in the dense forward is measured, not guessed), and each method at
`--density`. Runs alternate between the baseline and the method (best of `--repeats`), and each method's
attention density is read from its own meter. The ideal whole-model speedup of a method is
1 / ((1 - a) + a x density) with `a` the attention share; the report gives the measured speedup, the ideal and
their ratio. JSON output, written after every row: a run that is interrupted (or given more methods or lengths)
resumes with the rows already in --out for the same model, dtype and density.

    python scripts/bench_prefill.py --model smollm2-135m-instruct --lengths 2048 4096 \\
        --out evals/results/bench_prefill_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

import longattn
from longattn.evals.runner import versions

# Method -> parameters at a target density d (and prompt length n); one entry per method family.
METHODS = {
    "sliding_window": lambda d, n: dict(density=d, density_length=n),
    "sink_window": lambda d, n: dict(sink_tokens=4, density=d, density_length=n),
    "dilated": lambda d, n: dict(dilation=2, density=d, density_length=n),
    "block_topk": lambda d, n: dict(block_size=64, density=d),
    "vertical_slash": lambda d, n: dict(density=d),
    "s2_attn": lambda d, n: dict(density=d, density_length=n),
    "sf_attn": lambda d, n: dict(density=d, density_length=n, sink_tokens=4),
    "routing": lambda d, n: dict(density=d),
}
NO_ATTENTION = "longattn_bench_no_attention"


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that costs nothing: zeros of the output's shape ([B, Q, Hq, D], as the interface returns)."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None


def forward_seconds(model, ids) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("evals/results/bench_prefill.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    model, _ = longattn.load_model(args.model, dtype=args.dtype, device="cpu")
    AttentionInterface.register(NO_ATTENTION, _no_attention)
    AttentionMaskInterface.register(NO_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    vocab = min(model.config.get_text_config().vocab_size, 32000)
    result = dict(model=args.model, dtype=args.dtype, target_density=args.density, repeats=args.repeats,
                  threads=torch.get_num_threads(), versions=versions(), rows=[],
                  baseline="the unpatched model (transformers' SDPA), alternating with each method in the same run",
                  goal="no method slower than dense at density <= 0.5; window family and vertical_slash at density "
                       "0.25 >= 80% of the ideal whole-model speedup at 8k")
    if args.out.exists():
        old = json.loads(args.out.read_text())
        if (old.get("model"), old.get("dtype"), old.get("target_density")) == (args.model, args.dtype, args.density):
            result["rows"] = old["rows"]
    rows = result["rows"]
    done = {(r["length"], r["method"]) for r in rows}

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))

    for length in args.lengths:
        ids = torch.randint(5, vocab, (1, length), generator=torch.Generator().manual_seed(0))
        if (length, "dense") in done:
            share = next(r["attention_share"] for r in rows if (r["length"], r["method"]) == (length, "dense"))
        else:
            dense = min(forward_seconds(model, ids) for _ in range(args.repeats))
            original = model.config._attn_implementation
            model.set_attn_implementation(NO_ATTENTION)
            rest = min(forward_seconds(model, ids) for _ in range(args.repeats))
            model.set_attn_implementation(original)
            share = max(0.0, (dense - rest) / dense)
            record(dict(length=length, method="dense", seconds=dense, density=1.0, speedup=1.0,
                        attention_share=share, rest_seconds=rest))
        for name in args.methods:
            if (length, name) in done:
                continue
            params = METHODS[name](args.density, length)
            times, base = [], []
            try:
                for _ in range(args.repeats):  # alternate with the baseline: both see the same machine
                    base.append(forward_seconds(model, ids))
                    longattn.patch(model, name, **params)
                    state = longattn.patch_state(model)
                    times.append(forward_seconds(model, ids))
                    density = state.meter.density("prefill")
                    longattn.unpatch(model)
            except (ValueError, longattn.UnsupportedModelError) as e:  # the method refuses this model: say why
                longattn.unpatch(model)
                record(dict(length=length, method=name, params=params, refused=str(e)))
                continue
            seconds, baseline = min(times), min(base)
            ideal = 1 / ((1 - share) + share * density)
            speedup = baseline / seconds
            record(dict(length=length, method=name, params=params, seconds=seconds, baseline_seconds=baseline,
                        density=density, speedup=speedup, ideal_speedup=ideal,
                        fraction_of_ideal=(speedup - 1) / (ideal - 1) if ideal > 1 else None))


if __name__ == "__main__":
    main()
