#!/usr/bin/env python
"""Sparse attention forward time and memory vs dense SDPA and vs FlexAttention with the same mask.

    python scripts/bench_sparse.py --out evals/results/bench_sparse.json

For each length: dense causal SDPA (the baseline), longattn's sink_window method (backend "auto", as users
get it: in inference on CPU, two causal halves per block of window - 1 queries with the sinks leading the
reversed previous half), and compiled FlexAttention with the same mask (compile time reported apart).
Times are the best of `--repeats` runs, dense and longattn alternating so that both see the same machine
(medians are reported too); peak memory comes from one more run each, apart (its RSS sampling thread would
perturb the timings). Speedups are ratios against the SDPA time measured in the same run; the ideal speedup
is dense FLOPs / computed FLOPs (causal pairs / attended pairs). Goal (issue 6) at 32k with sink 4 + window
2048: >= 70% of the ideal speedup, no slower than FlexAttention, peak memory linear in S x window.
`fraction_of_ideal_bound` is what the two causal kernel calls alone reach (inputs already reversed, no
merge): the ceiling of this tiling with torch's CPU kernel on the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from longattn.evals.memory import PeakMemory
from longattn.kernels import AttentionMask, dense_attention
from longattn.kernels.masks import sinks_and_window
from longattn.methods import AttendCall, SinkWindow


def timed(fns: dict, repeats: int) -> dict:
    """name -> (best, median) seconds over `repeats` runs of every function in turn (after one warm-up)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def peak_bytes(fn) -> int:
    with PeakMemory() as pm:
        fn()
    return pm.peak_bytes


def halves_kernel_only(q, k, v, window, sinks, scale):
    """The two causal kernel calls of the causal-halves path on all whole blocks (sinks leading the reversed
    previous halves), with the reversed inputs prepared outside: returns the function to time and the pairs
    it attends."""
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    t = window - 1
    n = q.shape[2] // t
    qb, kb, vb = (x[0, :, :n * t].unflatten(1, (n, t)).transpose(0, 1) for x in (q, k, v))
    lead = (torch.zeros_like(qb[1:, :, :sinks]), k[0, :, :sinks].expand(n - 1, -1, -1, -1),
            v[0, :, :sinks].expand(n - 1, -1, -1, -1))
    rev = [torch.cat([a, x[:-1].flip(2)], 2) if i else torch.cat([a, x[1:].flip(2)], 2)
           for i, (a, x) in enumerate(zip(lead, (qb, kb, vb)))]

    def run():
        kernel(qb, kb, vb, 0.0, True, scale=scale)
        kernel(*rev, 0.0, True, scale=scale)

    pairs = 2 * n * t * (t + 1) // 2 - t * (t + 1) // 2 + (n - 1) * t * sinks  # block 0 has no previous half
    return run, pairs * q.shape[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its CPU compile takes ~20 s/shape)")
    ap.add_argument("--out", type=Path, default=Path("evals/results/bench_sparse.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)

    rows = []
    for s in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(s)
        q = torch.randn(1, args.heads, s, args.head_dim, generator=g)
        k, v = (torch.randn(1, args.kv_heads, s, args.head_dim, generator=g) for _ in range(2))
        scale = args.head_dim ** -0.5
        causal = AttentionMask.causal(s)
        pattern = causal.restrict(sinks_and_window(args.sink_tokens, args.window))
        method = SinkWindow(sink_tokens=args.sink_tokens, window=args.window)  # backend "auto", as users get it
        attended = causal.pair_count(args.window, sink_tokens=args.sink_tokens)
        ideal = causal.pair_count() / attended

        def run_dense():
            return dense_attention(q, k, v, causal, scale=scale, backend="sdpa")

        def run_longattn():
            return method.attend(q, k, v, causal, AttendCall(scale=scale))

        kernels_only, kernel_pairs = halves_kernel_only(q, k, v, args.window, args.sink_tokens, scale)
        times = timed({"dense": run_dense, "longattn": run_longattn, "kernels": kernels_only}, args.repeats)
        (t_dense, t_dense_med), (t_gather, t_gather_med), (t_kernels, _) = (
            times["dense"], times["longattn"], times["kernels"])
        m_dense, m_gather = peak_bytes(run_dense), peak_bytes(run_longattn)
        # Exactness spot check on the last 256 queries against the explicit mask (only 256 x S materialized).
        tail = AttentionMask(1, 256, s, pattern.fn, q_offset=s - 256)
        ref = dense_attention(q[:, :, -256:], k, v, AttentionMask.from_tensor(tail.materialize()), scale=scale,
                              backend="math")
        got = run_longattn()[:, :, -256:]
        row = {"seq_len": s, "attended_pairs": attended, "density": round(attended / causal.pair_count(), 5),
               "ideal_speedup": round(ideal, 3), "sdpa_dense_s": round(t_dense, 4),
               "longattn_s": round(t_gather, 4), "longattn_speedup": round(t_dense / t_gather, 3),
               "fraction_of_ideal": round(t_dense / t_gather / ideal, 3),
               "sdpa_dense_median_s": round(t_dense_med, 4), "longattn_median_s": round(t_gather_med, 4),
               "fraction_of_ideal_medians": round(t_dense_med / t_gather_med / ideal, 3),
               "sdpa_dense_peak_bytes": m_dense, "longattn_peak_bytes": m_gather,
               "longattn_peak_bytes_per_s_window": round(m_gather / (s * (args.window + args.sink_tokens)), 2),
               "max_abs_err_last_256_queries": float((got - ref).abs().max())}
        # Ceiling of this tiling with torch's CPU kernel: the two causal calls alone, per attended pair, against
        # dense causal SDPA's pair rate (both measured in the same alternating runs).
        rate_ratio = (kernel_pairs / t_kernels) / (causal.pair_count() * args.heads / t_dense)
        row.update(kernels_only_s=round(t_kernels, 4), kernel_pair_rate_vs_dense=round(rate_ratio, 3),
                   fraction_of_ideal_bound=round(rate_ratio, 3))
        if not args.no_flex:
            t0 = time.perf_counter()
            out = dense_attention(q, k, v, pattern, scale=scale, backend="flex")  # compiles the kernel + mask
            compile_s = time.perf_counter() - t0
            pattern._cache.clear()  # time mask building as part of each call, as the gathered path does
            def run_flex():
                pattern._cache.clear()
                return dense_attention(q, k, v, pattern, scale=scale, backend="flex")

            t_flex = timed({"flex": run_flex}, args.repeats)["flex"][0]
            m_flex = peak_bytes(run_flex)
            row.update(flex_s=round(t_flex, 4), flex_first_call_s=round(compile_s, 2),
                       flex_speedup=round(t_dense / t_flex, 3), longattn_vs_flex=round(t_flex / t_gather, 3),
                       flex_peak_bytes=m_flex, flex_max_abs_err=float((out[:, :, -256:] - ref).abs().max()))
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"benchmark": "sparse_forward", "pattern": f"sink {args.sink_tokens} + window {args.window}",
              "goal": "at 32k: longattn_speedup >= 0.7 x ideal_speedup, longattn_s <= flex_s, memory ~ S x window",
              "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                        "dtype": "float32"},
              "repeats": args.repeats, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                         f"{'cuda' if torch.cuda.is_available() else 'cpu'}",
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
