"""Vertical-slash sparse prefill (MInference): per head, a few key columns and a few diagonals, estimated from
the last queries of the prompt."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.dense import dense_attention
from ..kernels.gathered import gathered_attention
from ..kernels.masks import AttentionMask
from .base import AttendCall, AttentionMethod, check

DEFAULT_VERTICAL, DEFAULT_SLASH = 1000, 2048  # MInference's default sizes
QUERY_CHUNK = 512  # queries per step when counting attended pairs
QUERY_TILE = 64  # queries per gathered tile: the keys its queries need are gathered once
# Above this share of their causal keys, the tiles' keys are not gathered (see vertical_slash_attention).
DENSE_ENOUGH = 0.25


def vertical_slash_select(query, key, mask: AttentionMask, scale: float, vertical_size: int, slash_size: int,
                          last_q: int, sink_columns: int, local_diagonals: int):
    """(columns [B, Hq, V], diagonal offsets [B, Hq, S]) per query head, as local key index / q - k offset.

    The last `last_q` queries attend densely (causal); a column's score is the attention mass it receives
    from them, a diagonal's (offset q - k) the mass along it. The first `sink_columns` columns and the
    `local_diagonals` most recent diagonals are always kept (MInference forces them too).
    """
    b, hq, q_len, d = query.shape
    groups = hq // key.shape[1]
    k_len = key.shape[2]
    n_last = min(last_q, q_len)
    q_last = query[:, :, -n_last:].float()
    k = key.float().repeat_interleave(groups, 1)
    q_pos = (torch.arange(q_len - n_last, q_len, device=query.device) + mask.q_offset).view(-1, 1)
    k_pos = (torch.arange(k_len, device=query.device) + mask.kv_offset).view(1, -1)
    last = AttentionMask(b, n_last, k_len, mask.fn, q_offset=mask.q_offset + q_len - n_last,
                         kv_offset=mask.kv_offset, device=query.device).materialize()  # [B, 1, n_last, K]
    probs = torch.softmax((q_last @ k.transpose(-1, -2) * scale).masked_fill(~last, float("-inf")), dim=-1)
    probs = probs.nan_to_num(0.0)
    vertical = probs.sum(dim=2)  # [B, Hq, K]
    first = mask.first_real_token()
    first = torch.zeros(1, dtype=torch.long) if first is None else first - mask.kv_offset
    sinks = first.to(query.device).view(-1, 1, 1) + torch.arange(sink_columns, device=query.device)
    sinks = sinks.clamp(max=k_len - 1).expand(b, hq, sink_columns)
    vertical.scatter_(-1, sinks, float("inf"))  # each row's first real tokens (left padding skipped)
    offsets = (q_pos - k_pos).clamp_min(0)  # [n_last, K]; keys after the query carry no mass anyway
    max_offset = mask.q_offset + q_len - 1 - mask.kv_offset
    slash = torch.zeros(b, hq, max_offset + 1, device=query.device)
    slash.scatter_add_(-1, offsets.reshape(1, 1, -1).expand(b, hq, -1), probs.reshape(b, hq, -1))
    slash[..., :local_diagonals] = float("inf")
    columns = vertical.topk(min(vertical_size, k_len), dim=-1).indices
    diagonals = slash.topk(min(slash_size, max_offset + 1), dim=-1).indices
    return columns, diagonals


def vertical_slash_attention(query, key, value, mask: AttentionMask, columns, diagonals, scale: float,
                             return_lse: bool = False):
    """Exact attention where query q sees key k iff the mask allows it and k is a selected column or q - k a
    selected diagonal. Per tile of QUERY_TILE queries, the keys any of its queries may see (the columns, and for
    each diagonal the run of keys it crosses in the tile) are gathered once and attended with SDPA, each query
    restricted to its own columns and diagonals: work ~ Q x (columns + diagonals + QUERY_TILE)."""
    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    groups = hq // key.shape[1]
    n_offsets = max(1, mask.q_offset + q_len - mask.kv_offset)  # offsets q - k that a causal pair can have
    is_column = torch.zeros(b, hq, k_len, dtype=torch.bool, device=query.device).scatter_(-1, columns, True)
    size = max(n_offsets, int(diagonals.max()) + 1)  # (offsets past the last causal one select no pair)
    is_diagonal = torch.zeros(b, hq, size, dtype=torch.bool, device=query.device).scatter_(-1, diagonals, True)
    is_diagonal = is_diagonal[..., :n_offsets]
    key_index = _tile_keys(is_column, is_diagonal, mask, q_len)
    tiles = torch.arange(key_index.shape[2], device=query.device)
    causal_keys = (torch.clamp((tiles + 1) * QUERY_TILE, max=q_len) + mask.q_offset - mask.kv_offset).clamp(1, k_len)
    if float((key_index >= 0).sum(-1).float().mean()) > DENSE_ENOUGH * float(causal_keys.float().mean()):
        # The tiles need most of their causal keys (short prompts, spread diagonals): gathering them costs more
        # than attending to the contiguous keys with the exact mask, which keeps GQA unexpanded and copies nothing.
        return _masked_chunks(query, key, value, mask, is_column, is_diagonal, scale, return_lse)
    if groups > 1:  # each query head picks its own keys: give every query head its KV head's keys
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)

    def own_keys(c0, c, idx):  # [B, Hq, c, 1, T, W]: is each gathered key a column or on a diagonal of the query?
        k = idx.clamp_min(0)
        col = is_column.gather(-1, k.flatten(2)).view_as(k).unsqueeze(3).unsqueeze(4)
        q_abs = (torch.arange(c0 * QUERY_TILE, (c0 + c) * QUERY_TILE, device=query.device)
                 + mask.q_offset).view(1, 1, c, 1, QUERY_TILE, 1)
        offset = q_abs - (k + mask.kv_offset).unsqueeze(3).unsqueeze(4)
        on_diag = is_diagonal.gather(-1, offset.clamp(0, n_offsets - 1).flatten(2)).view_as(offset) & (offset >= 0)
        return col | on_diag

    return gathered_attention(query, key, value, mask, key_index, block_size=QUERY_TILE, scale=scale,
                              return_lse=return_lse, tile_filter=own_keys)


def _masked_chunks(query, key, value, mask: AttentionMask, is_column, is_diagonal, scale: float, return_lse: bool):
    """The same attention, QUERY_CHUNK queries at a time over the keys up to the chunk's last query, with the exact
    mask [B, Hq, chunk, keys] (the model's mask, and column or selected diagonal)."""
    from ..kernels.dense import sdpa_tensors

    q_len, n_offsets = query.shape[2], is_diagonal.shape[-1]
    b_idx = torch.arange(query.shape[0], device=query.device).view(-1, 1, 1, 1)
    h_idx = torch.zeros(1, dtype=torch.long, device=query.device).view(1, 1, 1, 1)
    outs, lses = [], []
    for q0 in range(0, q_len, QUERY_CHUNK):
        c = min(QUERY_CHUNK, q_len - q0)
        q_abs = (torch.arange(q0, q0 + c, device=query.device) + mask.q_offset).view(1, 1, c, 1)
        end = min(key.shape[2], int(q_abs.max()) - mask.kv_offset + 1)  # keys after the chunk's last query: none
        k_abs = (torch.arange(end, device=query.device) + mask.kv_offset).view(1, 1, 1, end)
        offset = (q_abs - k_abs).clamp(0, n_offsets - 1)  # [1, 1, c, end]
        chosen = is_column[..., :end].unsqueeze(2) | is_diagonal.gather(
            -1, offset.expand(*is_diagonal.shape[:2], c, end).flatten(2)).view(*is_diagonal.shape[:2], c, end)
        allowed = chosen & mask.fn(b_idx, h_idx, q_abs, k_abs)
        res = sdpa_tensors(query[:, :, q0:q0 + c], key[:, :, :end], value[:, :, :end], allowed, is_causal=False,
                           scale=scale, return_lse=return_lse)
        out, lse = res if isinstance(res, tuple) else (res, None)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _tile_keys(is_column, is_diagonal, mask: AttentionMask, q_len: int) -> torch.Tensor:
    """[B, Hq, tiles, W] local indices of the keys each tile of queries may need (-1 = empty slot): its heads'
    columns, and every key some query of the tile reaches along a selected diagonal, up to the tile's last query."""
    b, hq, k_len = is_column.shape
    n_tiles = math.ceil(q_len / QUERY_TILE)
    # Prefix counts of the selected offsets: does some diagonal s fall in [lo, hi]?
    counts = torch.nn.functional.pad(is_diagonal.long().cumsum(-1), (1, 0))  # [B, Hq, n_offsets + 1]
    n_offsets = is_diagonal.shape[-1]
    k_abs = torch.arange(k_len, device=is_column.device) + mask.kv_offset
    chunk = max(1, (1 << 24) // max(1, b * hq * k_len))  # tiles whose [B, Hq, tiles, K] coverage is held at once
    parts, width = [], 1
    for t0 in range(0, n_tiles, chunk):
        first = (torch.arange(t0, min(t0 + chunk, n_tiles), device=is_column.device) * QUERY_TILE + mask.q_offset)
        last = torch.clamp(first + QUERY_TILE - 1, max=mask.q_offset + q_len - 1)
        lo = (first.view(-1, 1) - k_abs).clamp(0, n_offsets)  # [t, K]
        hi = (last.view(-1, 1) - k_abs + 1).clamp(0, n_offsets)
        on_diag = (counts.gather(-1, hi.flatten().expand(b, hq, -1)) -
                   counts.gather(-1, lo.flatten().expand(b, hq, -1))).view(b, hq, -1, k_len) > 0
        causal = (k_abs.view(1, -1) <= last.view(-1, 1))  # [t, K]
        need = (on_diag | is_column.unsqueeze(2)) & causal
        order = torch.arange(k_len, device=is_column.device)
        ranked = torch.where(need, order, order + k_len).sort(dim=-1).values  # needed keys first, in order
        parts.append(ranked)
        width = max(width, int(need.sum(-1).max()))
    ranked = torch.cat(parts, dim=2)[..., :width]
    return torch.where(ranked < k_len, ranked, torch.full_like(ranked, -1))


@dataclass
class VerticalSlash(AttentionMethod):
    """Vertical-slash sparse attention for prefill (Jiang et al. 2024, MInference 1.0, arXiv:2407.02490):
    per head, the `vertical_size` key columns and `slash_size` diagonals that the last `last_q` queries
    attend to most (plus `sink_columns` first columns and `local_diagonals` most recent diagonals) are
    computed, exactly, for every query of the prompt.

    The pattern needs the prompt's last queries, so it is a prefill method: decoding steps (one query) attend
    densely, as in MInference. A prompt shorter than `last_q` is attended densely too.

    Parameters
    ----------
    vertical_size, slash_size : int
        Columns and diagonals kept per head (>= 1; 1000 and 2048 unless `density` is given).
    density : float or None
        Instead of the two sizes, in (0, 1]: at each prompt length S, columns + diagonals = density x (S + 1) / 2
        rounded down, at least one of each (a column or diagonal covers at most S of the S (S + 1) / 2 causal pairs),
        split 1 : 2 as in the default sizes. It bounds the density from above; the meter reports what was
        attended.
    last_q : int
        Queries used to estimate the pattern (>= 1).
    sink_columns, local_diagonals : int
        Columns at the start and diagonals next to the main one that are always kept (>= 0).
    """

    name = "vertical_slash"
    paper = "Jiang et al. 2024, MInference 1.0 (arXiv:2407.02490)"
    summary = "per-head key columns + diagonals estimated from the last queries (prefill)"

    vertical_size: int | None = None
    slash_size: int | None = None
    last_q: int = 64
    sink_columns: int = 4
    local_diagonals: int = 64
    density: float | None = None

    def validate(self):
        if self.density is not None:
            if self.vertical_size is not None or self.slash_size is not None:
                raise ValueError(f"{self.name}: give either density or vertical_size / slash_size, not both")
            check(self.name, "density", isinstance(self.density, (int, float)) and 0 < self.density <= 1,
                  "in (0, 1]", self.density)
            at_least_one = ("last_q",)
        else:
            self.vertical_size = DEFAULT_VERTICAL if self.vertical_size is None else self.vertical_size
            self.slash_size = DEFAULT_SLASH if self.slash_size is None else self.slash_size
            at_least_one = ("vertical_size", "slash_size", "last_q")
        for name in at_least_one:
            value = getattr(self, name)
            check(self.name, name, isinstance(value, int) and value >= 1, "an integer >= 1", value)
        for name in ("sink_columns", "local_diagonals"):
            value = getattr(self, name)
            check(self.name, name, isinstance(value, int) and value >= 0, "an integer >= 0", value)

    def sizes(self, length: int) -> tuple[int, int]:
        """(columns, diagonals) per head for a prompt of `length` tokens."""
        if self.density is None:
            return self.vertical_size, self.slash_size
        budget = max(2, math.floor(self.density * (length + 1) / 2))
        vertical = max(1, round(budget * DEFAULT_VERTICAL / (DEFAULT_VERTICAL + DEFAULT_SLASH)))
        return vertical, max(1, budget - vertical)

    def attend(self, query, key, value, mask, call: AttendCall):
        if call.dropout:
            raise ValueError(f"{self.name}: attention dropout is not supported")
        if query.shape[2] <= self.last_q:  # decode steps and short prompts: dense (see the docstring)
            return dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap)
        if call.softcap is not None:
            raise ValueError(f"{self.name}: logit soft-capping (Gemma2) is not supported")
        vertical_size, slash_size = self.sizes(mask.kv_offset + mask.kv_len)
        columns, diagonals = vertical_slash_select(query, key, mask, call.scale, vertical_size, slash_size,
                                                   self.last_q, self.sink_columns, self.local_diagonals)
        call.attended_pairs = _pairs(mask, columns, diagonals)
        return vertical_slash_attention(query, key, value, mask, columns, diagonals, call.scale)


def _pairs(mask: AttentionMask, columns, diagonals) -> int:
    """Causal pairs covered by the selected columns and diagonals, averaged over sequences and heads
    (counted in query chunks: never Q x slash_size at once)."""
    col_abs = columns.cpu() + mask.kv_offset
    per_col = (mask.q_offset + mask.q_len - torch.clamp(col_abs, min=mask.q_offset)).clamp_min(0)
    total = int(per_col.sum())  # every query at or after a column attends to it
    is_col = torch.zeros(*columns.shape[:2], mask.kv_offset + mask.kv_len, dtype=torch.bool)
    is_col.scatter_(-1, col_abs, True)
    diag = diagonals.cpu().unsqueeze(2)  # [B, H, 1, S]
    for q0 in range(0, mask.q_len, QUERY_CHUNK):
        q_abs = torch.arange(q0, min(q0 + QUERY_CHUNK, mask.q_len)) + mask.q_offset
        k_abs = q_abs.view(1, 1, -1, 1) - diag  # [B, H, chunk, S]
        in_range = (k_abs >= mask.kv_offset) & (k_abs < mask.kv_offset + mask.kv_len)
        dup = is_col.gather(-1, k_abs.clamp(0, is_col.shape[-1] - 1).flatten(2)).view_as(k_abs)
        total += int((in_range & ~dup).sum())
    return total // (columns.shape[0] * columns.shape[1])
