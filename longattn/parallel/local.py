"""Exact attention of local query runs against local key runs: the work one ring step (or Ulysses) does.

Partial results are merged with the log-sum-exp in float32, the reason errors do not grow with the number of
ranks: out = sum_b exp(lse_b - lse) out_b with lse = logsumexp_b lse_b.
"""
from __future__ import annotations

import torch

from ..kernels.primitives import merge_lse
from .blocks import block_backward, block_forward
from .patterns import CAUSAL_DIAGONAL, EMPTY, PARTIAL, BlockPattern, Run

MAX_BLOCK = 1024  # positions per side of one kernel call (see _pairs)


def coalesce(runs: list[Run]) -> list[Run]:
    """Merge runs that follow each other both locally and in absolute position (one kernel call, not two)."""
    out: list[Run] = []
    for start, n in runs:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out


def split(runs: list[Run], size: int) -> list[Run]:
    """Runs cut into pieces of at most `size` positions."""
    return [(a, min(size, s + n - a)) for s, n in runs for a in range(s, s + n, size)]


def _pairs(q_runs: list[Run], k_runs: list[Run], pattern: BlockPattern):
    """(query slice, key slice, mask kind, q run, k run) of every block that is not fully masked. Blocks span
    at most MAX_BLOCK positions per side: a kernel call's temporaries (its output, its dQ/dK/dV, the CPU
    backward's query-sized scratch) then stay bounded instead of growing with the shard, and pieces above
    the causal diagonal are skipped like any other empty block."""
    q_runs, k_runs = split(coalesce(q_runs), MAX_BLOCK), split(coalesce(k_runs), MAX_BLOCK)
    q_at = 0
    for qr in q_runs:
        k_at = 0
        for kr in k_runs:
            kind = pattern.classify(qr, kr)
            if kind != EMPTY:
                yield slice(q_at, q_at + qr[1]), slice(k_at, k_at + kr[1]), kind, qr, kr
            k_at += kr[1]
        q_at += qr[1]


def merge_block(out: torch.Tensor, lse: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """out, lse (float32 views, updated in place) <- the exact softmax merge with one more block. `out_blk` is
    scratch (a kernel's fresh output): it is scaled in place instead of into another block-sized tensor."""
    lse.copy_(merge_lse(out_blk.float(), lse_blk, out, lse, out=out)[1])


def attend_runs(q, k, v, q_runs, k_runs, pattern: BlockPattern, scale: float, backend: str,
                out: torch.Tensor, lse: torch.Tensor) -> int:
    """Add the blocks (q_runs x k_runs) to the running float32 `out` / `lse`; returns blocks computed."""
    done = 0
    for qs, ks, kind, qr, kr in _pairs(q_runs, k_runs, pattern):
        mask = pattern.block_mask(qr, kr, q.device) if kind == PARTIAL else None
        o, l = block_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], mask, kind == CAUSAL_DIAGONAL, scale, backend)
        merge_block(out[:, :, qs], lse[:, :, qs], o, l)
        del o, l, mask  # before the next block's kernel allocates its own
        done += 1
    return done


def attend_runs_backward(dout, q, k, v, out, lse, q_runs, k_runs, pattern: BlockPattern, scale: float,
                         backend: str, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> int:
    """Accumulate (in float32, in place) the gradients of the same blocks; `out`/`lse` are the final ones."""
    done = 0
    for qs, ks, kind, qr, kr in _pairs(q_runs, k_runs, pattern):
        mask = pattern.block_mask(qr, kr, q.device) if kind == PARTIAL else None
        g = block_backward(dout[:, :, qs], q[:, :, qs], k[:, :, ks], v[:, :, ks], out[:, :, qs], lse[:, :, qs],
                           mask, kind == CAUSAL_DIAGONAL, scale, backend)
        dq[:, :, qs] += g[0]
        dk[:, :, ks] += g[1]
        dv[:, :, ks] += g[2]
        del g, mask  # before the next block's kernel allocates its own
        done += 1
    return done


class LocalRunsAttention(torch.autograd.Function):
    """Exact attention over runs on one rank (what Ulysses runs after its all-to-all), with its backward."""

    @staticmethod
    def forward(ctx, q, k, v, runs, pattern, scale, backend):
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        attend_runs(q, k, v, runs, runs, pattern, scale, backend, out, lse)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (runs, pattern, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        runs, pattern, scale, backend = ctx.args
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros_like(dk)
        attend_runs_backward(dout, q, k, v, out, lse, runs, runs, pattern, scale, backend, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
