"""Shared pieces of the key-driven grouped-query variants (KDGQA, DGQA, PGQA; Khan et al. 2024,
arXiv:2408.08454): turning key-head norms into a query-head allocation, and attention where each query head
reads the key/value head it was allocated to."""
from __future__ import annotations

import torch

from ..kernels.dense import dense_attention
from ..kernels.masks import AttentionMask


def key_head_norms(key: torch.Tensor, mask: AttentionMask, per_sequence: bool) -> torch.Tensor:
    """Frobenius norm over (positions, head dim) of each key head: [Hkv] summed over the batch (the paper's
    allocation is one per forward pass), or [B, Hkv] with `per_sequence`. Padded key positions are left out;
    RoPE rotates each key without changing its norm, so post-RoPE keys give the same norms as pre-RoPE ones."""
    pad = mask.key_padding()
    k = key.float()
    if pad is not None:
        k = k * pad.to(k.device).view(pad.shape[0], 1, -1, 1)
    norms = k.pow(2).sum(dim=(2, 3)).sqrt()  # [B, Hkv]
    return norms if per_sequence else norms.sum(0)


def allocate(weights: torch.Tensor, heads: int, min_max: bool) -> torch.Tensor:
    """Query heads per KV head [..., G] (summing to `heads`) in proportion to `weights` [..., G].

    With `min_max` (KDGQA) the weights are first min-max normalized, as the authors do, so the weakest head
    gets a share of 0 before the sum is repaired. Shares are rounded (half to even), then the largest count
    loses one while the total is above `heads` and the smallest gains one while it is below. Equal weights
    (nothing to tell the heads apart, e.g. a single KV head) give the uniform GQA split."""
    flat = weights.detach().double().reshape(-1, weights.shape[-1])
    out = []
    for w in flat:
        g = w.numel()
        if min_max:
            span = w.max() - w.min()
            w = (w - w.min()) / span if span > 0 else torch.ones_like(w)
        total = w.sum()
        w = w / total if total > 0 else torch.full_like(w, 1.0 / g)
        counts = torch.round(w * heads).long()
        while counts.sum() > heads:
            counts[torch.argmax(counts)] -= 1
        while counts.sum() < heads:
            counts[torch.argmin(counts)] += 1
        out.append(counts)
    return torch.stack(out).view(*weights.shape[:-1], weights.shape[-1])


def head_to_kv(counts: torch.Tensor) -> torch.Tensor:
    """[..., G] query heads per KV head -> [..., Hq] the KV head of each query head (contiguous blocks, in
    head order: the first counts[0] query heads read KV head 0, and so on)."""
    flat = counts.reshape(-1, counts.shape[-1])
    g = counts.shape[-1]
    rows = [torch.repeat_interleave(torch.arange(g), c.cpu()) for c in flat]
    return torch.stack(rows).view(*counts.shape[:-1], -1)


def uniform_counts(heads: int, kv_heads: int) -> torch.Tensor:
    return torch.full((kv_heads,), heads // kv_heads, dtype=torch.long)


def gather_heads(x: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, K, D] -> [B, Hq, K, D] with head h = x[:, kv_index[h]] (kv_index [Hq] or [B, Hq])."""
    b, _, k, d = x.shape
    idx = kv_index.to(x.device)
    idx = idx.expand(b, -1) if idx.dim() == 1 else idx
    return x.gather(1, idx.view(b, -1, 1, 1).expand(-1, -1, k, d))


def allocated_attention(query, key, value, mask, kv_index, call, backend: str = "auto"):
    """Exact softmax attention where query head h attends with key/value head kv_index[h]."""
    return dense_attention(query, gather_heads(key, kv_index), gather_heads(value, kv_index), mask,
                           scale=call.scale, softcap=call.softcap, dropout=call.dropout, backend=backend)
