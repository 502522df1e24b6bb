"""Explicit attention probabilities for a block of queries, for methods that edit the attention map itself
(PGQA's noise, ACT's sink calibration). Work and memory per block: block x keys, never queries x keys."""
from __future__ import annotations

import torch

from ..kernels.masks import AttentionMask

QUERY_CHUNK = 512


def allowed_block(mask: AttentionMask, start: int, stop: int, device) -> torch.Tensor:
    """[B, 1, stop - start, K] bool: which keys the queries start..stop-1 (local indices) may attend to."""
    b = torch.arange(mask.batch_size, device=device).view(-1, 1, 1, 1)
    h = torch.zeros(1, dtype=torch.long, device=device).view(1, 1, 1, 1)
    q = (torch.arange(start, stop, device=device) + mask.q_offset).view(1, 1, -1, 1)
    k = (torch.arange(mask.kv_len, device=device) + mask.kv_offset).view(1, 1, 1, -1)
    return mask.fn(b, h, q, k).expand(mask.batch_size, 1, stop - start, mask.kv_len)


def block_probs(query, key, mask: AttentionMask, start: int, stop: int, scale: float, softcap=None):
    """Softmax probabilities [B, H, stop - start, K] (float32) and the allowed mask [B, 1, ., K]; `key` is
    already expanded to the query heads. Rows with no allowed key are all zero."""
    allowed = allowed_block(mask, start, stop, query.device)
    scores = torch.matmul(query[:, :, start:stop].float(), key.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    # A row with no allowed key (a padded query) gets zeros, without NaN in the forward or backward pass.
    any_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0)
    return torch.softmax(scores, dim=-1) * any_key, allowed
