"""Sliding-window attention as two causal halves per block of queries, on the CPU's own causal kernel.

Cut the queries into blocks of t = window - 1. A query at offset r of block i sees the keys of block i up to
offset r (top-left causal: the kernel's `is_causal` switch, no mask) and the keys of block i - 1 from offset r
on (anti-causal: causal again once queries and keys of the tile are both reversed). The two softmaxes are
merged by their log-sum-exps. Only attended pairs are computed (plus the kernel's own diagonal waste), and no
mask tensor is read: on CPU a float mask costs a share of the kernel time and small tiles run its GEMMs in small
splits, which is what holds the masked-tile path back (scripts/bench_sparse.py; evals/results/bench_sparse.json).
Inference only: the LSE of torch's CPU flash kernel carries no gradient.
"""
from __future__ import annotations

import torch

from .primitives import cpu_flash_forward, merge_lse

# Blocks of at least this many queries (window - 1): below it torch's CPU flash kernel splits its queries in small
# GEMMs and the masked tiles are faster (the crossover was measured with scripts/bench_sparse.py).
HALVES_MIN_BLOCK = 900


def halves_query_ranges(q_len: int, k_len: int, delta: int, span: int, sinks_end: int = 0
                        ) -> list[tuple[int, int, bool]]:
    """The query ranges (first, stop, sinks_inside) this kernel covers for a plain causal window of `span`
    keys, query i's newest key being key i + delta: the blocks whose halves (keys [b t + delta - t,
    b t + delta + t)) lie inside the keys, and the block whose own half starts at key 0 (no previous half).
    `sinks_inside`: the sinks (keys [0, sinks_end)) can be added to the previous halves (they start after the
    sinks), or need nothing (no previous half); otherwise they are left to the caller."""
    t = span - 1
    if t < 1:
        return []
    ranges = []
    for b in range(max(0, -(-(-delta) // t)), min(q_len // t, (k_len - delta) // t)):
        own_start = b * t + delta
        if 0 < own_start < t:  # the previous half would start before key 0
            continue
        inside = own_start == 0 or own_start - t >= sinks_end
        if ranges and ranges[-1][1] == b * t and ranges[-1][2] == inside:
            ranges[-1] = (ranges[-1][0], (b + 1) * t, inside)
        else:
            ranges.append((b * t, (b + 1) * t, inside))
    return ranges


def causal_halves_window(query, key, value, out, lse, *, first: int, stop: int, delta: int, span: int,
                         scale: float, sinks: torch.Tensor | None = None):
    """Window attention for queries [first, stop) of one batch row (`query` [Hq, Q, D], `key`/`value`
    [Hkv, K, D], GQA by query-head slices), written into `out` [Hq, Q, D] and, if given, `lse` [Hq, Q].
    `sinks` (local key indices, all before every previous half) are seen by every query of a block with a
    previous half: they lead its reversed tile, behind as many dummy queries (top-left causal lets every
    real query see them)."""
    t = span - 1
    # One block per kernel call: the copies and outputs stay small, and the reversed copies live in buffers that
    # every block of the call reuses, so the allocator does not fault in fresh pages for each block.
    work = {}
    for a in range(first, stop, t):
        _halves_block(query, key, value, out, lse, first=a, delta=delta, t=t, scale=scale, sinks=sinks, work=work)


def _buffer(work: dict, name: str, like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A tensor of `shape` kept in `work` and reused by the next block of the same call."""
    buf = work.get(name)
    if buf is None or buf.shape != shape:
        buf = work[name] = like.new_empty(shape)
    return buf


def _halves_block(query, key, value, out, lse, *, first, delta, t, scale, sinks, work):
    """causal_halves_window on the block of t = window - 1 queries starting at `first`."""
    kernel = cpu_flash_forward
    n = 1  # one block per call (the block views below are written for any count)
    hq, hkv = query.shape[0], key.shape[0]
    groups = hq // hkv
    k0 = first + delta  # the first key of block 0's own (diagonal) half
    dev = query.device

    def blocks(x, start, count):  # [count, H, t, D] view of `count` consecutive blocks of t positions
        return x[:, start:start + count * t].unflatten(1, (count, t)).transpose(0, 1)

    q_blocks, k_diag, v_diag = blocks(query, first, n), blocks(key, k0, n), blocks(value, k0, n)
    out_blocks = blocks(out, first, n)
    lse_blocks = None if lse is None else lse[:, first:first + t].unflatten(1, (n, t)).transpose(0, 1)
    p0 = 1 if k0 == 0 else 0  # a block whose own half starts at key 0 has no previous half
    m = n - p0
    ns = 0 if sinks is None or not m else sinks.numel()
    reverse = torch.arange(t - 1, -1, -1, device=dev)
    if m:
        # Previous halves reversed, sinks first: one copy each of the queries, keys and values (the only copies
        # of inputs made here). index_select along the block's rows is faster than a flat gather.
        def reversed_blocks(x, start, lead, name):  # [m, H, ns + t, D]: `lead` rows, then the m blocks reversed
            res = _buffer(work, name, x, (m, x.shape[0], ns + t, x.shape[-1]))
            torch.index_select(blocks(x, start, m), 2, reverse, out=res[:, :, ns:])
            if ns:
                res[:, :, :ns] = lead
            return res

        q_rev = reversed_blocks(query, first + p0 * t, 0.0, "q")  # dummy query rows, discarded
        kv_start = k0 - t + p0 * t
        if ns:
            sinks = sinks.to(dev)
            k_rev = reversed_blocks(key, kv_start, key[:, sinks].unsqueeze(0), "k")
            v_rev = reversed_blocks(value, kv_start, value[:, sinks].unsqueeze(0), "v")
        else:
            k_rev, v_rev = reversed_blocks(key, kv_start, None, "k"), reversed_blocks(value, kv_start, None, "v")
    for j in range(groups):  # query heads j, j + groups, ... share key heads 0, 1, ... (repeat_interleave order)
        heads = slice(j, hq, groups)
        o_diag, l_diag = kernel(q_blocks[:, heads], k_diag, v_diag, 0.0, True, scale=scale)[:2]
        if p0:
            out_blocks[0, heads] = o_diag[0]
            if lse_blocks is not None:
                lse_blocks[0, heads] = l_diag[0]
        if not m:
            continue
        o_prev, l_prev = kernel(q_rev[:, heads], k_rev, v_rev, 0.0, True, scale=scale)[:2]
        o_prev, l_prev = o_prev[:, :, ns:], l_prev[:, :, ns:].float()
        l_own = l_diag[p0:].float()
        l_prev = l_prev.flip(-1)
        o_back = torch.index_select(o_prev, 2, reverse, out=_buffer(work, "o", o_prev, (m,) + o_prev.shape[1:]))
        # the previous half (back in row order) merged with the own half, written straight into the output
        total = merge_lse(o_diag[p0:], l_own, o_back, l_prev, out=out_blocks[p0:, heads])[1]
        if lse_blocks is not None:
            lse_blocks[p0:, heads] = total
