"""Vertical-slash sparse prefill (MInference): per head, a few key columns and a few diagonals, estimated from
the last queries of the prompt."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.dense import dense_attention
from ..kernels.masks import AttentionMask
from .base import AttendCall, AttentionMethod, check

DEFAULT_VERTICAL, DEFAULT_SLASH = 1000, 2048  # MInference's default sizes
QUERY_CHUNK = 512  # queries per step of the kernel (bounds the gathered diagonal keys)


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
    vertical[..., :sink_columns] = float("inf")
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
    selected diagonal. Work ~ Q x (columns + diagonals): columns are a shared-key matmul, diagonals one gathered
    key per query and diagonal, and both go through one softmax (a key in both sets counts once)."""
    b, hq, q_len, d = query.shape
    k_len = key.shape[2]
    groups = hq // key.shape[1]
    if groups > 1:  # each query head picks its own keys: give every query head its KV head's keys
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    k_cols = key.gather(2, columns.unsqueeze(-1).expand(-1, -1, -1, d))  # [B, Hq, V, D]
    v_cols = value.gather(2, columns.unsqueeze(-1).expand(-1, -1, -1, d))
    is_column = torch.zeros(b, hq, k_len, dtype=torch.bool, device=query.device).scatter_(-1, columns, True)
    batch_idx = torch.arange(b, device=query.device).view(b, 1, 1, 1)
    head_idx = torch.zeros(1, dtype=torch.long, device=query.device).view(1, 1, 1, 1)
    outs, lses = [], []
    for q0 in range(0, q_len, QUERY_CHUNK):
        qc = query[:, :, q0:q0 + QUERY_CHUNK]
        c = qc.shape[2]
        q_abs = (torch.arange(q0, q0 + c, device=query.device) + mask.q_offset).view(1, 1, c, 1)
        # Columns: one matmul against the shared selected keys.
        s_col = torch.matmul(qc, k_cols.transpose(-1, -2)).float() * scale  # [B, Hq, c, V]
        col_abs = (columns + mask.kv_offset).unsqueeze(2)  # [B, Hq, 1, V]
        ok_col = mask.fn(batch_idx, head_idx, q_abs, col_abs)
        # Diagonals: key q - s for each selected offset s (skipped where it is a selected column already).
        k_local = q_abs - mask.kv_offset - diagonals.unsqueeze(2)  # [B, Hq, c, S]
        in_range = (k_local >= 0) & (k_local < k_len)
        safe = k_local.clamp(0, k_len - 1)
        ok_diag = in_range & mask.fn(batch_idx, head_idx, q_abs, safe + mask.kv_offset)
        ok_diag = ok_diag & ~is_column.gather(-1, safe.flatten(2)).view_as(safe)
        flat = safe.flatten(2)  # [B, Hq, c * S]
        k_diag = key.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, d)).view(*safe.shape, d)
        v_diag = value.gather(2, flat.unsqueeze(-1).expand(-1, -1, -1, d)).view(*safe.shape, d)
        s_diag = (qc.unsqueeze(3) * k_diag).sum(-1).float() * scale  # [B, Hq, c, S]
        scores = torch.cat([s_col.masked_fill(~ok_col, float("-inf")), s_diag.masked_fill(~ok_diag, float("-inf"))],
                           dim=-1)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.clamp_min(-1e30).unsqueeze(-1))  # a query with no key: 0, not nan
        n_col = columns.shape[-1]
        p_col, p_diag = probs[..., :n_col].to(value.dtype), probs[..., n_col:].to(value.dtype)
        outs.append(torch.matmul(p_col, v_cols) + (p_diag.unsqueeze(-1) * v_diag).sum(3))
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


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
