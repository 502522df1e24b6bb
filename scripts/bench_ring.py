#!/usr/bin/env python
"""Ring attention on CPU (gloo): per-rank peak memory and time of forward + backward vs sequence length for
P = 1, 2, 4 ranks, and the longest sequence that fits a per-rank memory budget.

    python scripts/bench_ring.py --out evals/results/bench_ring.json

Each P runs in its own freshly spawned process group; every rank holds a zigzag shard of q, k, v
([1, heads, S/P, head_dim], fp32, causal) and runs ring_attention forward and backward. Memory is the peak
resident set size above the level after the inputs exist (longattn.evals.memory.PeakMemory: sampled RSS on
CPU) from before this rank's q, k, v and output gradient exist: the layer's inputs plus what attention
allocates (output, LSE, the K/V blocks and dK/dV accumulators in flight, gradients, kernel scratch).
Goal (issue 8): per-rank attention memory ~ 1/P, so the longest sequence within a fixed per-rank budget grows
~ x P. Times on a 2-core machine with P processes sharing the cores measure no speed-up; they show the cost.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from longattn.parallel.launch import run_distributed

MIB = 2 ** 20


def bench_rank(rank, world, lengths, heads, head_dim, reps):
    from longattn.evals.memory import PeakMemory
    from longattn.parallel import ShardLayout, ring_attention

    layout = ShardLayout("zigzag", world)
    warm = torch.randn(1, heads, 256, head_dim, requires_grad=True)  # one-time costs (thread pools, gloo buffers)
    ring_attention(warm, warm, warm, layout=layout).sum().backward()
    out = []
    for seq in lengths:
        times, peaks, totals = [], [], []
        for _ in range(reps):
            torch.distributed.barrier()
            with PeakMemory("cpu") as total:  # the layer's whole footprint: its inputs and output gradient too
                g = torch.Generator().manual_seed(seq)
                q, k, v = (torch.randn(1, heads, seq // world, head_dim, generator=g).requires_grad_()
                           for _ in range(3))
                grad = torch.randn(1, heads, seq // world, head_dim, generator=g)
                with PeakMemory("cpu") as work:  # what attention allocates on top of them
                    t0 = time.perf_counter()
                    ring_attention(q, k, v, layout=layout).backward(grad)
                    times.append(time.perf_counter() - t0)
            peaks.append(work.peak_bytes)
            totals.append(total.peak_bytes)
            del q, k, v, grad
        out.append({"seq_len": seq, "time_s": min(times), "peak_mib": max(peaks) / MIB,
                    "total_mib": max(totals) / MIB})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--max-tokens-per-rank", type=int, default=8192,
                   help="skip (P, S) with S / P above this (keeps the run to a few minutes on 2 cores)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--budget-length", type=int, default=8192,
                   help="the per-rank memory budget is P=1's peak at this length")
    p.add_argument("--out", default="evals/results/bench_ring.json")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    results = []
    for world in args.ranks:
        lengths = [s for s in args.lengths if s // world <= args.max_tokens_per_rank and s % (2 * world) == 0]
        threads = max(1, cores // world)
        t0 = time.perf_counter()
        per_rank = run_distributed(bench_rank, world, lengths, args.heads, args.head_dim, args.reps,
                                   timeout_s=600, threads=threads)
        for i, seq in enumerate(lengths):
            rows = [r[i] for r in per_rank]
            results.append({"ranks": world, "seq_len": seq, "tokens_per_rank": seq // world,
                            "attention_work_mib_per_rank": [round(r["peak_mib"], 2) for r in rows],
                            "peak_mib_per_rank": [round(r["total_mib"], 2) for r in rows],
                            "max_peak_mib": round(max(r["total_mib"] for r in rows), 2),
                            "time_s": round(max(r["time_s"] for r in rows), 4), "threads_per_rank": threads})
        print(f"P={world}: {len(lengths)} lengths in {time.perf_counter() - t0:.0f} s", flush=True)
    base = {r["seq_len"]: r["max_peak_mib"] for r in results if r["ranks"] == 1}
    for r in results:
        r["mem_ratio_vs_p1"] = round(r["max_peak_mib"] / base[r["seq_len"]], 3) if r["seq_len"] in base else None
    if args.budget_length not in base:
        raise SystemExit(f"--budget-length {args.budget_length} was not measured with P=1")
    budget = base[args.budget_length]
    fits = {}
    for world in args.ranks:
        rows = [r for r in results if r["ranks"] == world]
        ok = [r["seq_len"] for r in rows if r["max_peak_mib"] <= budget * 1.05]  # 5%: RSS sampling noise
        # Memory is linear in tokens per rank: extrapolate from the longest measured length.
        last = max(rows, key=lambda r: r["seq_len"])
        fits[str(world)] = {"longest_measured_within_budget": max(ok, default=None),
                            "extrapolated_longest": int(budget / last["max_peak_mib"] * last["seq_len"])}
    first = fits[str(args.ranks[0])]["extrapolated_longest"]
    for i, world in enumerate(args.ranks):
        fits[str(world)]["growth_vs_p1"] = round(fits[str(world)]["extrapolated_longest"] / first, 2)
        if i > 1:  # among ring runs (P >= 2), where the K/V and dK/dV in flight are part of every rank's memory
            prev = fits[str(args.ranks[i - 1])]["extrapolated_longest"]
            fits[str(world)][f"growth_vs_p{args.ranks[i - 1]}"] = round(fits[str(world)]["extrapolated_longest"] / prev, 2)
    report = {
        "benchmark": "ring attention forward+backward, causal, zigzag, fp32, gloo on CPU",
        "config": {"heads": args.heads, "head_dim": args.head_dim, "batch": 1, "reps": args.reps,
                   "cpu_cores": cores, "torch": torch.__version__, "platform": platform.platform()},
        "memory": "per rank, peak RSS above the level before the layer's q, k, v and output gradient exist "
                  "(peak_mib_per_rank; used for the budget) and above the level after they exist "
                  "(attention_work_mib_per_rank); longattn.evals.memory.PeakMemory",
        "budget_mib_per_rank": budget, "budget_definition": f"P=1 peak at {args.budget_length} tokens",
        "results": results, "longest_sequence_within_budget": fits,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        print(f"P={r['ranks']} S={r['seq_len']:6d}  peak/rank {r['max_peak_mib']:8.1f} MiB  "
              f"ratio vs P=1 {r['mem_ratio_vs_p1']}  time {r['time_s']:.3f} s")
    print(json.dumps(fits))


if __name__ == "__main__":
    main()
