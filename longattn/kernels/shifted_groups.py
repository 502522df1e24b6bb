"""LongLoRA's shifted sparse attention as the paper computes it: roll half of the heads by half a group,
attend causally inside groups of equal size, roll back. Work ~ S x group_size, and SDPA does every group
at once (the groups become a batch dimension)."""
from __future__ import annotations

import torch

from .dense import sdpa_tensors


def shifted_group_attention(query, key, value, group_size: int, *, scale: float, padding: torch.Tensor | None = None):
    """query [B, Hq, S, D], key/value [B, Hkv, S, D] with S a multiple of group_size and Hkv even.

    Heads of the first half attend causally within groups [0, G), [G, 2G), ...; heads of the second half do so
    after the sequence is rolled left by G / 2 (the last group then joins the sequence's end with its start,
    as in the paper). `padding` [B, S] bool (True = real token) masks padded keys.
    """
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    if s % group_size:
        raise ValueError(f"shifted sparse attention needs a sequence length that is a multiple of group_size "
                         f"({group_size}), got {s}")
    if hq % 2 or hkv % 2:
        raise ValueError(f"shifted sparse attention shifts half of the heads: needs an even number of query and "
                         f"key/value heads, got {hq} and {hkv}")
    shift = group_size // 2
    n_groups = s // group_size
    causal = torch.ones(group_size, group_size, dtype=torch.bool, device=query.device).tril()
    outs = []
    for half, roll in ((0, 0), (1, -shift)):
        q = query[:, half * hq // 2:(half + 1) * hq // 2]
        k = key[:, half * hkv // 2:(half + 1) * hkv // 2]
        v = value[:, half * hkv // 2:(half + 1) * hkv // 2]
        pad = padding
        if roll:
            q, k, v = (t.roll(roll, dims=2) for t in (q, k, v))
            pad = None if padding is None else padding.roll(roll, dims=1)
        # [B, H, S, D] -> [B * n_groups, H, G, D]: every group is an independent causal attention.
        def split(t):
            return t.view(b, t.shape[1], n_groups, group_size, d).transpose(1, 2).reshape(-1, t.shape[1],
                                                                                            group_size, d)

        mask = causal
        if pad is not None:
            mask = (causal & pad.view(b, n_groups, 1, 1, group_size)).view(b * n_groups, 1, group_size, group_size)
        out = sdpa_tensors(split(q), split(k), split(v), mask, is_causal=False, scale=scale)
        out = out.view(b, n_groups, q.shape[1], group_size, d).transpose(1, 2).reshape(b, q.shape[1], s, d)
        outs.append(out.roll(-roll, dims=2) if roll else out)
    return torch.cat(outs, dim=1)
