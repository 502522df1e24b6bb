#!/usr/bin/env python
"""Ring attention on CPU (gloo): per-rank attention memory and time of forward + backward vs sequence length
for P = 1, 2, 4 ranks, and the longest sequence whose per-rank attention memory fits a fixed budget.

    python scripts/bench_ring.py --out evals/results/bench_ring.json

Each P runs in freshly spawned process groups; every rank holds a zigzag shard of q, k, v
([1, heads, S/P, head_dim] and [1, kv_heads, S/P, head_dim], fp32, causal) and runs ring_attention forward
and backward with a given output gradient.

Memory (exact): the peak of live tensor bytes that the forward and backward allocate on a rank, from
torch.profiler's memory events (profile_memory=True: every allocation and free of torch's CPU allocator,
with its size; the running sum of the events is the live total). It includes everything attention allocates:
output and LSE, K/V blocks and dK/dV accumulators in flight, gradients of q, k, v, kernel scratch; not the
inputs q, k, v and the output gradient, which exist before (their bytes are reported as inputs_mib). The
method is checked at start-up on allocations of known size (method_check in the JSON). Secondary: peak
process RSS above the level before the call (longattn.evals.memory.PeakMemory, sampled; noisy, includes
allocator caching and gloo's own buffers).

Goal (issue 8): per-rank attention memory ~ 1/P of single-device attention at the same total length, so the
longest sequence within a fixed per-rank budget grows ~ x P. Two single-device baselines: the same ring code
on one rank (P=1), and torch's fused scaled_dot_product_attention on one process (sdpa: what the model runs
without sequence parallelism). Budgets: each baseline's memory at --budget-length tokens. The longest
sequence is found by measurement: memory is linear in the tokens per rank, so a line through the two longest
measured lengths predicts it, and runs at the prediction and one granule above confirm it. Times on a
2-core machine with P processes sharing the cores measure no speed-up; they show the cost.
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


class TensorMemory:
    """`with TensorMemory() as tm: ...`: tm.peak_bytes / tm.end_bytes = the peak / final sum of tensor bytes
    allocated minus freed on this process's CPU allocator inside the block (torch.profiler memory events).
    Tensors that existed before the block do not count, even when freed inside it (the allocator reports
    only frees of blocks it saw allocated while profiling). `start_bytes` shifts the running sum: the live
    bytes of an earlier block that are still alive."""

    def __init__(self, start_bytes: int = 0):
        self.start_bytes = start_bytes

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        events = [(e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]"]
        events.sort(key=lambda t: t[0])  # stable: same-time events keep their recorded order
        live = peak = self.start_bytes
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak_bytes, self.end_bytes, self.events = peak, live, len(events)
        del self._prof
        return False


def check_method() -> dict:
    """TensorMemory on allocations of known size: plain tensors, a multi-threaded matmul's output, a gradient
    allocated by the autograd engine, and a free of a tensor made before the block (must not count)."""
    old = torch.empty(1_000_000)
    a_in, b_in = torch.randn(1000, 300), torch.randn(300, 500)
    x = torch.randn(500_000, requires_grad=True)
    with TensorMemory() as tm:
        t1 = torch.empty(1_000_000)  # 4,000,000 bytes
        t2 = torch.empty(500_000)  # 2,000,000
        del t1, old  # `old` predates the block: no event
        prod = a_in @ b_in  # 2,000,000
        y = x * 2.0  # 2,000,000
        y.sum().backward()  # the gradient of y * 2: 2,000,000, stays as x.grad
        del t2, prod, y
    # t1 + t2 = 6e6 first; the peak is in the backward: t2 + prod + y + x.grad = 8e6 (+ scalars).
    expected_peak = 8_000_000
    expected_end = x.grad.numel() * 4
    ok = abs(tm.peak_bytes - expected_peak) <= 64 and abs(tm.end_bytes - expected_end) <= 64
    res = {"expected_peak_bytes": expected_peak, "measured_peak_bytes": tm.peak_bytes,
           "expected_end_bytes": expected_end, "measured_end_bytes": tm.end_bytes, "ok": ok}
    if not ok:
        raise SystemExit(f"TensorMemory does not measure known allocations correctly: {res}")
    return res


def make_inputs(seq, world, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(seq)
    n = seq // world
    q = torch.randn(1, heads, n, head_dim, generator=g).requires_grad_()
    k = torch.randn(1, kv_heads, n, head_dim, generator=g).requires_grad_()
    v = torch.randn(1, kv_heads, n, head_dim, generator=g).requires_grad_()
    grad = torch.randn(1, heads, n, head_dim, generator=g)
    return q, k, v, grad


def attention_fn(impl, world):
    """impl "ring": ring_attention over the zigzag layout; "sdpa": torch's fused SDPA on one process (the
    single-device baseline, what a model runs without sequence parallelism)."""
    if impl == "sdpa":
        import torch.nn.functional as F

        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from longattn.parallel import ShardLayout, ring_attention

    layout = ShardLayout("zigzag", world)
    return lambda q, k, v: ring_attention(q, k, v, layout=layout)


def attention_memory(attend, seq, world, heads, kv_heads, head_dim):
    """(peak bytes over forward + backward, live bytes after the forward) allocated by `attend`."""
    q, k, v, grad = make_inputs(seq, world, heads, kv_heads, head_dim)
    torch.distributed.barrier()
    with TensorMemory() as fwd:
        out = attend(q, k, v)
    with TensorMemory(start_bytes=fwd.end_bytes) as bwd:  # frees of forward tensors are reported here
        out.backward(grad)
        del out
    return max(fwd.peak_bytes, bwd.peak_bytes), fwd.end_bytes


def bench_rank(rank, world, impl, lengths, heads, kv_heads, head_dim, reps, timed):
    from longattn.evals.memory import PeakMemory

    attend = attention_fn(impl, world)
    q, k, v, grad = make_inputs(512 * world, world, heads, kv_heads, head_dim)  # one-time costs (thread pools)
    attend(q, k, v).backward(grad)
    del q, k, v, grad
    out = []
    for seq in lengths:
        peak, after_fwd = attention_memory(attend, seq, world, heads, kv_heads, head_dim)
        row = {"seq_len": seq, "peak_bytes": peak, "after_forward_bytes": after_fwd}
        if timed:
            times, rss = [], []
            for _ in range(reps):
                q, k, v, grad = make_inputs(seq, world, heads, kv_heads, head_dim)
                torch.distributed.barrier()
                with PeakMemory("cpu") as pm:
                    t0 = time.perf_counter()
                    attend(q, k, v).backward(grad)
                    times.append(time.perf_counter() - t0)
                rss.append(pm.peak_bytes)
                del q, k, v, grad
            row.update(time_s=min(times), rss_bytes=max(rss))
        out.append(row)
    return out


def run(world, lengths, args, timed, impl="ring"):
    threads = max(1, (os.cpu_count() or 1) // world)
    per_rank = run_distributed(bench_rank, world, impl, lengths, args.heads, args.kv_heads, args.head_dim, args.reps,
                               timed, timeout_s=1800, threads=threads)
    return [[r[i] for r in per_rank] for i in range(len(lengths))], threads


def longest_within(world, measured, budget, granule, args):
    """The longest multiple of `granule` tokens whose max per-rank attention memory is within `budget`:
    predicted from the line through the two longest measured lengths (`measured`: seq_len -> bytes, extended
    by the runs made here), then confirmed by runs at the prediction (fits) and one granule above (does not)."""
    (s0, m0), (s1, m1) = sorted(measured.items())[-2:]
    slope = (m1 - m0) / (s1 - s0)
    guess = max(granule, int((budget - (m0 - slope * s0)) / slope) // granule * granule)

    def mem(seq):
        if seq not in measured:
            res, _ = run(world, [seq], args, timed=False)
            measured[seq] = max(r["peak_bytes"] for r in res[0])
        return measured[seq]

    seq = guess
    while mem(seq) > budget and seq > granule:
        seq -= granule
    while mem(seq + granule) <= budget:
        seq += granule
    return {"longest_seq_len": seq, "attention_mib_at_longest": round(mem(seq) / MIB, 2),
            f"attention_mib_at_{seq + granule}": round(mem(seq + granule) / MIB, 2),
            "predicted_from_line": guess}


def table_row(impl, world, seq, rows, args, threads):
    n = seq // world
    inputs = (2 * args.heads + 2 * args.kv_heads) * n * args.head_dim * 4
    return {
        "impl": impl, "ranks": world, "seq_len": seq, "tokens_per_rank": n,
        "attention_mib_per_rank": [round(r["peak_bytes"] / MIB, 3) for r in rows],
        "max_attention_bytes": max(r["peak_bytes"] for r in rows),
        "max_attention_mib": round(max(r["peak_bytes"] for r in rows) / MIB, 3),
        "after_forward_mib": round(max(r["after_forward_bytes"] for r in rows) / MIB, 3),
        "inputs_mib_per_rank": round(inputs / MIB, 3),
        "rss_mib_per_rank": [round(r["rss_bytes"] / MIB, 1) for r in rows],
        "time_s": round(max(r["time_s"] for r in rows), 4), "threads_per_rank": threads}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--max-tokens-per-rank", type=int, default=8192,
                   help="skip (P, S) with S / P above this (keeps the run to a few minutes on 2 cores)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=1, help="timed repetitions (memory is measured once: it is exact)")
    p.add_argument("--budget-length", type=int, default=8192,
                   help="the per-rank budgets are ring P=1's and sdpa's attention memory at this length")
    p.add_argument("--granule", type=int, default=1024, help="resolution of the longest-sequence search (tokens)")
    p.add_argument("--out", default="evals/results/bench_ring.json")
    args = p.parse_args(argv)
    if args.ranks[0] != 1:
        raise SystemExit("--ranks must start with 1 (the baseline)")
    method_check = check_method()
    results = []
    for world in args.ranks:
        lengths = [s for s in args.lengths if s // world <= args.max_tokens_per_rank and s % (2 * world) == 0]
        if world == 1 and args.budget_length not in lengths:
            lengths = sorted(lengths + [args.budget_length])
        t0 = time.perf_counter()
        per_len, threads = run(world, lengths, args, timed=True)
        results += [table_row("ring", world, seq, rows, args, threads) for seq, rows in zip(lengths, per_len)]
        print(f"P={world}: {len(lengths)} lengths in {time.perf_counter() - t0:.0f} s", flush=True)
    p1_lengths = [r["seq_len"] for r in results if r["ranks"] == 1]
    per_len, threads = run(1, p1_lengths, args, timed=True, impl="sdpa")
    sdpa = [table_row("sdpa", 1, seq, rows, args, threads) for seq, rows in zip(p1_lengths, per_len)]
    base = {r["seq_len"]: r["max_attention_bytes"] for r in results if r["ranks"] == 1}
    sdpa_base = {r["seq_len"]: r["max_attention_bytes"] for r in sdpa}
    for r in results + sdpa:
        seq = r["seq_len"]
        r["mem_ratio_vs_p1"] = round(r["max_attention_bytes"] / base[seq], 3) if seq in base else None
        r["mem_ratio_vs_sdpa"] = round(r["max_attention_bytes"] / sdpa_base[seq], 3) if seq in sdpa_base else None
        r["ideal_ratio"] = round(1 / r["ranks"], 3)
    budgets = {"ring_p1": base[args.budget_length], "sdpa": sdpa_base[args.budget_length]}
    fits = {name: {} for name in budgets}
    for world in args.ranks:
        t0 = time.perf_counter()
        measured = {r["seq_len"]: r["max_attention_bytes"] for r in results if r["ranks"] == world}
        for name, budget in budgets.items():
            fits[name][str(world)] = longest_within(world, measured, budget, args.granule, args)
        print(f"P={world}: longest within budgets {[f[str(world)] for f in fits.values()]} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for name in budgets:
        for world in args.ranks:
            fits[name][str(world)]["growth_vs_single_device"] = round(
                fits[name][str(world)]["longest_seq_len"] / args.budget_length, 2)
    report = {
        "benchmark": "ring attention forward+backward, causal, zigzag, fp32, gloo on CPU",
        "config": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": 1,
                   "dtype": "float32", "timed_reps": args.reps, "cpu_cores": os.cpu_count(),
                   "torch": torch.__version__, "platform": platform.platform()},
        "memory": "attention_mib_per_rank: per rank, the peak of live tensor bytes allocated during attention's "
                  "forward + backward (torch.profiler memory events; exact, excludes the inputs q, k, v and output "
                  "gradient, whose size is inputs_mib_per_rank); after_forward_mib: what the forward leaves alive "
                  "for the backward; rss_mib_per_rank: secondary, sampled peak RSS above the level before the call",
        "method_check": method_check,
        "baselines": "ring P=1: the same ring code on one rank; sdpa: torch.nn.functional.scaled_dot_product_attention "
                     "(is_causal, enable_gqa) forward + backward on one process, what the model runs without "
                     "sequence parallelism",
        "budget_mib_per_rank": {name: round(b / MIB, 3) for name, b in budgets.items()},
        "budget_definition": f"attention memory of ring P=1 / of sdpa at {args.budget_length} tokens",
        "results": [{k: v for k, v in r.items() if k != "max_attention_bytes"} for r in results],
        "single_device_sdpa": [{k: v for k, v in r.items() if k != "max_attention_bytes"} for r in sdpa],
        "longest_sequence_within_budget": fits,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for r in report["single_device_sdpa"] + report["results"]:
        print(f"{r['impl']:4s} P={r['ranks']} S={r['seq_len']:6d}  attention/rank {r['max_attention_mib']:9.2f} MiB  "
              f"vs ring P=1 {r['mem_ratio_vs_p1']}  vs sdpa {r['mem_ratio_vs_sdpa']}  time {r['time_s']:.3f} s")
    print(json.dumps(fits))


if __name__ == "__main__":
    main()
