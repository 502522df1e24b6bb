"""Gathered-key attention: each block of queries attends only to the keys it was given, gathered into a
dense tile; the exact mask predicate is applied inside the tile.

Memory and work grow with queries x selected keys (S x window for local patterns), never S x S. Plain
torch ops (gather, matmul, softmax), so it runs on CPU and CUDA and has a backward pass everywhere (where
compiled FlexAttention has none on CPU). Query blocks are processed in chunks to bound the working set.
"""
from __future__ import annotations

import math

import torch

from . import causal_halves
from .masks import AttentionMask
from .primitives import softmax_lse


def local_key_index(mask: AttentionMask, block_size: int, span: int | None, sinks: tuple[int, int] | None = None
                    ) -> torch.Tensor:
    """[n_query_blocks, n_selected] local key indices each query block may need (-1 marks unused slots).

    Keys within `span` positions back from any query of the block (all earlier keys when `span` is None) and
    the absolute positions sinks = (first, last) inclusive. A superset is fine: the exact predicate is applied
    to every gathered pair.
    """
    n_blocks = math.ceil(mask.q_len / block_size)
    kv_first, kv_last = mask.kv_offset, mask.kv_offset + mask.kv_len - 1
    starts = torch.arange(n_blocks) * block_size + mask.q_offset  # absolute position of each block's first query
    ends = torch.clamp(starts + block_size - 1, max=mask.q_offset + mask.q_len - 1)
    lo = torch.full_like(starts, kv_first) if span is None else torch.clamp(starts - span + 1, min=kv_first)
    hi = torch.clamp(ends, max=kv_last)
    width = int((hi - lo + 1).clamp_min(0).max())
    rng = torch.arange(width)
    window = lo[:, None] + rng[None, :]
    window = torch.where(window <= hi[:, None], window, torch.full_like(window, -1))
    parts = [window]
    if sinks is not None:
        s_lo, s_hi = max(sinks[0], kv_first), min(sinks[1], kv_last)
        if s_hi >= s_lo:
            sink = torch.arange(s_lo, s_hi + 1).expand(n_blocks, -1)
            # Sink keys already inside a block's window would be gathered twice: keep them only once.
            sink = torch.where(sink < lo[:, None], sink, torch.full_like(sink, -1))
            parts.insert(0, sink)
    index = torch.cat(parts, dim=1)
    return torch.where(index >= 0, index - mask.kv_offset, index)


def gathered_attention(query, key, value, mask: AttentionMask, key_index: torch.Tensor, *, block_size: int,
                       scale: float, softcap: float | None = None, return_lse: bool = False, tile_filter=None,
                       max_tile_elements: int = 1 << 25):
    """Attention of query blocks over their gathered keys.

    query [B, Hq, Q, D]; key, value [B, Hkv, K, D] (GQA unexpanded). `key_index` holds local key indices
    (-1 = unused slot): [n_query_blocks, n_sel] shared by all sequences and heads (see `local_key_index`), or
    [B, Hkv, n_query_blocks, n_sel] per sequence and KV head. `tile_filter(c0, c, index)`, if given, returns
    extra allowed pairs for query blocks c0 .. c0 + c as a bool tensor broadcastable to
    [B, Hkv, c, G, block_size, n_sel] (G = query heads per KV head).
    Returns output [B, Hq, Q, D] (and LSE [B, Hq, Q] in float32).
    """
    from .dense import sdpa_tensors

    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    if key_index.dim() == 2:
        key_index = key_index[None, None]
    n_blocks, n_sel = key_index.shape[-2:]
    shared = key_index.shape[0] == 1 and key_index.shape[1] == 1
    pad = n_blocks * block_size - q_len
    q = torch.nn.functional.pad(query, (0, 0, 0, pad)) if pad else query
    # [B, Hkv, blocks, G, bs, D]: the query heads sharing a KV head sit together (GQA stays unexpanded).
    q = q.view(b, hkv, groups, n_blocks, block_size, d).transpose(2, 3)
    key_index = key_index.to(query.device)
    # Query blocks per chunk, so that one chunk's score tile stays under max_tile_elements.
    chunk = max(1, max_tile_elements // max(1, b * hq * block_size * n_sel))
    batch_idx = torch.arange(b, device=query.device).view(b, 1, 1, 1, 1, 1)
    head_idx = torch.zeros(1, dtype=torch.long, device=query.device).view(1, 1, 1, 1, 1, 1)
    outs, lses = [], []
    for c0 in range(0, n_blocks, chunk):
        idx = key_index[:, :, c0:c0 + chunk]  # [1 or B, 1 or Hkv, c, n_sel]
        c = idx.shape[2]
        safe = idx.clamp_min(0)
        if shared:
            kg, vg = key[:, :, safe[0, 0]], value[:, :, safe[0, 0]]  # [B, Hkv, c, n_sel, D]
        else:
            flat = safe.expand(b, hkv, c, n_sel).reshape(b, hkv, c * n_sel, 1).expand(-1, -1, -1, d)
            kg = key.gather(2, flat).view(b, hkv, c, n_sel, d)
            vg = value.gather(2, flat).view(b, hkv, c, n_sel, d)
        kg, vg = kg.reshape(b * hkv * c, 1, n_sel, d), vg.reshape(b * hkv * c, 1, n_sel, d)
        qc = q[:, :, c0:c0 + c].reshape(b * hkv * c, groups, block_size, d)
        q_pos = (torch.arange(c0 * block_size, (c0 + c) * block_size, device=query.device)
                 + mask.q_offset).view(1, 1, c, 1, block_size, 1)
        real_q = q_pos < mask.q_offset + q_len  # rows past the end pad the last block: they attend nothing
        q_eval = torch.clamp(q_pos, max=mask.q_offset + q_len - 1)  # (and must not index past the mask's data)
        k_pos = (safe + mask.kv_offset).unsqueeze(3).unsqueeze(4)  # [., ., c, 1, 1, n_sel]
        allowed = mask.fn(batch_idx, head_idx, q_eval, k_pos) & (idx >= 0).unsqueeze(3).unsqueeze(4) & real_q
        if tile_filter is not None:
            allowed = allowed & tile_filter(c0, c, idx)
        g_mask = allowed.shape[3]
        allowed = allowed.expand(b, hkv, c, g_mask, block_size, n_sel).reshape(b * hkv * c, g_mask, block_size,
                                                                              n_sel)
        if softcap is None:
            res = sdpa_tensors(qc, kg, vg, allowed, is_causal=False, scale=scale, return_lse=return_lse)
        else:  # SDPA has no soft-capping: explicit scores for this (rare) case
            res = _explicit(qc, kg, vg, allowed, scale, softcap)
        out, lse = res if isinstance(res, tuple) else (res, None)
        outs.append(out.view(b, hkv, c, groups, block_size, d))
        lses.append(None if lse is None else lse.view(b, hkv, c, groups, block_size))
    out = torch.cat(outs, dim=2).transpose(2, 3).reshape(b, hq, n_blocks * block_size, d)[:, :, :q_len]
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=2).transpose(2, 3).reshape(b, hq, n_blocks * block_size)[:, :, :q_len]
    return out, lse


def _explicit(q, k, v, allowed, scale, softcap):
    scores = softcap * torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap)
    probs, lse = softmax_lse(scores.float().masked_fill(~allowed, float("-inf")))
    return torch.matmul(probs.to(v.dtype), v), lse

def strided_window_attention(query, key, value, mask: AttentionMask, *, span: int,
                             sink_positions: torch.Tensor | None = None, key_padding: torch.Tensor | None = None,
                             block_size: int, scale: float):
    """Window attention without copying keys: query block i sees the `span + block_size - 1` keys ending at
    its last query, as a zero-copy strided view of the keys; one translation-invariant mask serves every
    block but the few that need their own: those whose tile starts before key 0 or holds a padded key.

    For masks that are a bottom-right causal window plus key padding (`key_padding` [B, K] bool, True = real
    key; None = none); any strides (dilated_strided_attention passes every d-th position).
    `sink_positions` ([B, n] absolute positions) adds sink keys, merged by log-sum-exp, which needs inference
    mode (the LSE of torch's CPU kernel carries no gradient); `mask.fn` decides which of them each query sees.
    Only the blocks whose tiles cross either end of the keys work on a (small) padded copy; every block's
    result is written once, into the output.
    """
    from .dense import sdpa_tensors

    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    bs = block_size
    n_blocks = math.ceil(q_len / bs)
    width = span + bs - 1
    delta = mask.q_offset - mask.kv_offset  # local key index of query 0
    left = span - 1
    dev = query.device
    r = torch.arange(bs, device=dev).view(bs, 1)
    j = torch.arange(width, device=dev).view(1, width)
    dist = r + left - j  # query row r minus key column j, in positions
    ok = (dist >= 0) & (dist < span)
    neg = float("-inf")
    shared_bias = torch.zeros(1, 1, bs, width, dtype=query.dtype, device=dev).masked_fill_(~ok, neg)
    starts = delta + torch.arange(n_blocks, device=dev) * bs - left  # local key of each block's column 0
    # Blocks [n_edge, n_inner_end) have whole query blocks and tiles inside the keys: views of the keys.
    n_edge = min(n_blocks, max(0, math.ceil((left - delta) / bs)))
    n_inner_end = max(n_edge, min(n_blocks, (k_len - width - delta + left) // bs + 1, q_len // bs))
    want_lse = sink_positions is not None
    # Long windows in inference on CPU: the queries whose window lies inside the keys go through two causal
    # halves per block (unmasked, see causal_halves.py); the tiles below cover the rest and padded rows.
    halves_ok = (query.device.type == "cpu" and span - 1 >= causal_halves.HALVES_MIN_BLOCK
                 and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))
    out = query.new_empty(b, hq, n_blocks * bs, d)
    lse = torch.empty(b, hq, n_blocks * bs, device=dev) if want_lse else None
    covered = [[] for _ in range(b)]  # per row: (first, stop, sinks, sinks_done) ranges done by causal halves
    for bi in range(b):
        row_pad = None if key_padding is None or bool(key_padding[bi].all()) else key_padding[bi]
        own = starts < 0  # blocks that need a mask of their own
        if row_pad is not None:  # ... and those whose tile holds a padded key (prefix sums over the tile)
            pads = torch.nn.functional.pad((~row_pad).to(torch.int32).cumsum(0), (1, 0))
            lo_c, hi_c = starts.clamp(0, k_len), (starts + width).clamp(0, k_len)
            own |= pads[hi_c] > pads[lo_c]
        covered[bi] = [] if not halves_ok or row_pad is not None else _halves_ranges(
            q_len, k_len, delta, span, None if sink_positions is None else sink_positions[bi] - mask.kv_offset)
        joined = []  # adjacent ranges joined, so that no tile straddling two of them is computed
        for first, stop, _, _ in covered[bi]:
            if joined and joined[-1][1] == first:
                joined[-1] = (joined[-1][0], stop)
            else:
                joined.append((first, stop))
        skip = [(-(-first // bs), stop // bs) for first, stop in joined]
        for a, c, needs_own in _runs(own, n_inner_end, max_run=32, skip=skip):
            if needs_own:
                cols = starts[a:c].view(-1, 1) + j  # [blocks, width] local key index
                real = (cols >= 0) & (cols < k_len)
                if row_pad is not None:
                    real &= row_pad[cols.clamp(0, k_len - 1)]
                bias = torch.zeros(c - a, 1, bs, width, dtype=query.dtype, device=dev).masked_fill_(
                    ~(ok & real.unsqueeze(1)).unsqueeze(1), neg)
            else:
                bias = shared_bias
            lo, hi = int(starts[a]), int(starts[c - 1]) + width  # local keys [lo, hi) cover the run's tiles
            kv = []
            for t in (key[bi], value[bi]):
                if lo < 0 or hi > k_len:  # an edge: pad just this range (the inner blocks use t itself)
                    t = torch.nn.functional.pad(t[:, max(lo, 0):min(hi, k_len)], (0, 0, max(0, -lo), max(0, hi - k_len)))
                    offset = 0
                else:
                    offset = lo
                s_h, s_s, s_d = t.stride()
                kv.append(t.as_strided((c - a, t.shape[0], width, d), (bs * s_s, s_h, s_s, s_d),
                                       t.storage_offset() + offset * s_s))
            qb = query[bi, :, a * bs:min(c * bs, q_len)]
            if qb.shape[1] < (c - a) * bs:  # the last, partial block: pad its queries (rows discarded)
                qb = torch.nn.functional.pad(qb, (0, 0, 0, (c - a) * bs - qb.shape[1]))
            qb = qb.unflatten(1, (c - a, bs)).transpose(0, 1)  # [blocks, Hq, bs, D]
            res = sdpa_tensors(qb, kv[0], kv[1], None, is_causal=False, scale=scale, return_lse=want_lse,
                               float_bias=bias)
            res_out, res_lse = res if want_lse else (res, None)
            out[bi, :, a * bs:c * bs].unflatten(1, (c - a, bs)).transpose(0, 1).copy_(res_out)
            if want_lse:
                lse[bi, :, a * bs:c * bs].unflatten(1, (c - a, bs)).transpose(0, 1).copy_(res_lse)
        # After the tiles: tiles that overlap a range are overwritten (its values include the sinks).
        for first, stop, sinks, _ in covered[bi]:
            causal_halves.causal_halves_window(query[bi], key[bi], value[bi], out[bi], lse[bi] if want_lse else None,
                                               first=first, stop=stop, delta=delta, span=span, scale=scale,
                                               sinks=sinks)
    out = out[:, :, :q_len]
    if not want_lse:
        return out
    lse = lse[:, :, :q_len]
    if not any(covered):
        return _merge_sinks(query, key, value, mask, out, lse, span, sink_positions, scale)
    for bi in range(b):  # where the halves added the sinks themselves, merge them into the other queries only
        bounds = [0] + [x for first, stop, _, done in covered[bi] if done for x in (first, stop)] + [q_len]
        for lo, hi in zip(bounds[::2], bounds[1::2]):
            if hi > lo:
                part = out[bi:bi + 1, :, lo:hi]
                res = _merge_sinks(query[bi:bi + 1, :, lo:hi], key[bi:bi + 1], value[bi:bi + 1], mask, part,
                                   lse[bi:bi + 1, :, lo:hi], span, sink_positions[bi:bi + 1], scale,
                                   row=bi, q_start=lo)
                if res.data_ptr() != part.data_ptr():  # not merged in place (not float32)
                    part.copy_(res)
    return out


def _halves_ranges(q_len, k_len, delta, span, sink_local):
    """(first, stop, sinks, sinks_done) query ranges for causal_halves_window in one unpadded row;
    `sink_local` are the row's sink keys (local indices; None: no sinks)."""
    sinks = None if sink_local is None else sink_local[(sink_local >= 0) & (sink_local < k_len)]
    if sinks is not None and not sinks.numel():
        sinks = None
    sinks_end = 0 if sinks is None else int(sinks.max()) + 1
    return [(first, stop, sinks if inside else None, inside or sinks is None)
            for first, stop, inside in causal_halves.halves_query_ranges(q_len, k_len, delta, span, sinks_end)]


def dilated_strided_attention(query, key, value, mask: AttentionMask, *, span: int, dilation: int,
                              key_padding: torch.Tensor | None = None, block_size: int, scale: float):
    """A dilated window as `dilation` plain windows: a query at a position p = r (mod dilation) only sees keys
    at positions = r, and among those, the ones within ceil(span / dilation) steps back. Each residue class
    is a strided view of the sequence, so only attended pairs are computed."""
    b, hq, q_len, d = query.shape
    out = query.new_empty(b, hq, q_len, d)
    for r in range(dilation):
        i0, j0 = (r - mask.q_offset) % dilation, (r - mask.kv_offset) % dilation  # first local index of class r
        if i0 >= q_len:
            continue
        qs, ks, vs = query[:, :, i0::dilation], key[:, :, j0::dilation], value[:, :, j0::dilation]
        # Positions of the class, counted in steps of `dilation` (exact: both offsets are = r mod dilation).
        sub = AttentionMask(b, qs.shape[2], ks.shape[2], q_offset=(mask.q_offset + i0 - r) // dilation,
                            kv_offset=(mask.kv_offset + j0 - r) // dilation, device=query.device)
        out[:, :, i0::dilation] = strided_window_attention(
            qs, ks, vs, sub, span=math.ceil(span / dilation), block_size=block_size, scale=scale,
            key_padding=None if key_padding is None else key_padding[:, j0::dilation])
    return out


def _runs(own: torch.Tensor, split_at: int, max_run: int, skip: list[tuple[int, int]] = ()):
    """(first, stop, needs_own) runs of consecutive blocks with the same `own`; runs also break at `split_at`
    (where tiles start to run past the last key) and after `max_run` blocks with masks of their own. Blocks
    in the ranges [lo, hi) of `skip` are left out (computed elsewhere)."""
    flags = own.tolist()
    runs, a = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[a] or i == split_at or (flags[a] and i - a == max_run):
            runs.append((a, i, flags[a]))
            a = i
    for lo_skip, hi_skip in skip:
        if hi_skip > lo_skip:
            runs = [(lo, hi, flag) for a, c, flag in runs
                    for lo, hi in ((a, min(c, lo_skip)), (max(a, hi_skip), c)) if lo < hi]
    return runs


def _merge_sinks(query, key, value, mask, out, lse, span, sink_positions, scale, row=None, q_start=0):
    """Add the sink keys ([B, n] absolute positions) that lie before each query's window and that `mask`
    allows, merging the two softmaxes by their LSEs (in place on a float32 `out`: the largest tensor here).
    With `row`, the tensors are that batch row's (batch 1) and the queries start at local index `q_start`."""
    b, hkv, k_len, d = key.shape
    groups = query.shape[1] // hkv
    n = sink_positions.shape[1]
    local = sink_positions.to(query.device) - mask.kv_offset
    present = (local >= 0) & (local < k_len)
    if not bool(present.any()):
        return out
    idx = local.clamp(0, k_len - 1)
    ks = key.gather(2, idx.view(b, 1, n, 1).expand(b, hkv, n, d)).repeat_interleave(groups, 1)
    vs = value.gather(2, idx.view(b, 1, n, 1).expand(b, hkv, n, d)).repeat_interleave(groups, 1)
    q_abs = (torch.arange(query.shape[2], device=query.device) + mask.q_offset + q_start).view(1, 1, -1, 1)
    k_abs = (idx + mask.kv_offset).view(b, 1, 1, n)
    rows = (torch.arange(b, device=query.device) if row is None else torch.tensor([row], device=query.device)
            ).view(b, 1, 1, 1)
    allowed = (mask.fn(rows, torch.zeros_like(rows), q_abs, k_abs) & (q_abs - k_abs >= span)
               & present.view(b, 1, 1, n))
    # The sinks' scores join the window's finished softmax (not a merge of two finished results: the sink
    # probabilities are normalised by the joint log-sum-exp in one step).
    s = (torch.matmul(query, ks.transpose(-1, -2)) * scale).float().masked_fill(~allowed, float("-inf"))
    total = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
    w_win = torch.exp(lse - total).nan_to_num(0.0).unsqueeze(-1)
    p_sink = torch.exp(s - total.unsqueeze(-1)).nan_to_num(0.0)
    if out.dtype == torch.float32 and not out.requires_grad:
        return out.mul_(w_win).add_(torch.matmul(p_sink, vs.float()))
    return (out.float() * w_win + torch.matmul(p_sink, vs.float())).to(out.dtype)


GATHER_BLOCK = 128  # queries per gathered tile
LOCAL_BACKENDS = ("auto", "gathered", "sdpa", "flex", "flash", "math")


def local_attention(query, key, value, pattern: AttentionMask, *, span: int | None, sinks: int = 0,
                    first_token: torch.Tensor | None = None, backend: str = "auto", scale: float,
                    softcap: float | None = None, dropout: float = 0.0, dilation: int = 1,
                    translation_invariant: bool = False, learned_sinks: torch.Tensor | None = None):
    """Attention under a local pattern (keys within `span` back, plus `sinks` first tokens).
    `learned_sinks` [Hq]: a model's learned sink logits (see kernels.dense.apply_learned_sinks).

    `translation_invariant` says that the pattern is exactly that window (and sinks; every `dilation`-th key
    within `span` when dilated) plus the mask's key padding: nothing else in the model's mask.

    backend "gathered" gathers only those keys (work and memory ~ S x span); "auto" takes the zero-copy
    strided tiles for a plain window whenever a tile is shorter than the keys (a masked dense kernel would
    compute every pair), gathers keys when that skips at least half of them, and otherwise uses the dense
    kernels with the pattern as a mask (sdpa / flex / math, as for dense attention).
    """
    from .dense import apply_learned_sinks, dense_attention

    # Fewer queries than a tile (decoding): one tile of exactly those queries, not a padded one of GATHER_BLOCK.
    block = min(GATHER_BLOCK, max(1, pattern.q_len))
    if pattern.window is not None:
        span = pattern.window if span is None else min(span, pattern.window)
    sink_range = None
    if sinks:
        lo = 0 if first_token is None else int(first_token.min())
        hi = (0 if first_token is None else int(first_token.max())) + sinks - 1
        sink_range = (lo, hi)
    if learned_sinks is not None:  # needs each row's log-sum-exp: the gathered tiles or a dense kernel give it
        index = local_key_index(pattern, block, span, sink_range) if backend in ("auto", "gathered") else None
        if index is not None and not dropout and (backend == "gathered" or index.shape[1] * 2 <= pattern.kv_len):
            out, lse = gathered_attention(query, key, value, pattern, index, block_size=block, scale=scale,
                                          softcap=softcap, return_lse=True)
            return apply_learned_sinks(out, lse, learned_sinks)
        return dense_attention(query, key, value, pattern, scale=scale, softcap=softcap, dropout=dropout,
                               backend=backend if backend != "gathered" else "auto", learned_sinks=learned_sinks)
    if backend in ("auto", "gathered"):
        # Fast path: a window (plus key padding, no other pattern in the model's mask) is the same for every
        # block of queries, so keys need no copying and one mask serves all blocks but those near pads.
        strided = (translation_invariant and span is not None and softcap is None and not dropout
                   and pattern.q_len >= GATHER_BLOCK and span + GATHER_BLOCK <= pattern.kv_len
                   and (not sinks or not (torch.is_grad_enabled() and query.requires_grad)))
        if strided:
            sink_positions = None
            if sinks:
                first = (torch.zeros(query.shape[0], dtype=torch.long, device=query.device) if first_token is None
                         else first_token.to(query.device).expand(query.shape[0]))
                sink_positions = first.view(-1, 1) + torch.arange(sinks, device=query.device)
            if dilation > 1:
                return dilated_strided_attention(query, key, value, pattern, span=span, dilation=dilation,
                                                 key_padding=pattern.key_padding(), block_size=GATHER_BLOCK,
                                                 scale=scale)
            return strided_window_attention(query, key, value, pattern, span=span, block_size=GATHER_BLOCK,
                                            sink_positions=sink_positions, key_padding=pattern.key_padding(),
                                            scale=scale)
        index = local_key_index(pattern, block, span, sink_range)
        worth_it = pattern.q_len >= GATHER_BLOCK and index.shape[1] * 2 <= pattern.kv_len
        decode_worth_it = pattern.q_len == 1 and index.shape[1] * 2 <= pattern.kv_len
        if backend == "gathered" or worth_it or decode_worth_it:
            if dropout:
                raise ValueError("attention dropout is not supported by the 'gathered' backend")
            return gathered_attention(query, key, value, pattern, index, block_size=block, scale=scale,
                                      softcap=softcap)
    return dense_attention(query, key, value, pattern, scale=scale, softcap=softcap, dropout=dropout,
                           backend=backend)
