"""AdaKV: one budget per layer, shared out among its heads by how concentrated their attention is."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..methods.base import check
from .base import best
from .snapkv import SnapKV


@dataclass
class AdaKV(SnapKV):
    """Head-adaptive budget allocation (Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive
    Budget Allocation for Efficient LLM Inference, arXiv:2407.11550) over SnapKV's pooled votes: the layer keeps
    budget x heads entries, chosen as the best votes across all of its KV heads together (each head first gets
    its own best `alpha_safeguard` x budget), so heads with concentrated attention give budget to heads with
    spread-out attention. Heads then hold different numbers of entries; the shorter ones have empty slots.

    Parameters
    ----------
    alpha_safeguard : float
        Fraction of the per-head budget every head keeps for itself (in [0, 1]).
    window, kernel_size, pooling, kv_budget, compression_ratio
        See SnapKV.
    """

    name = "adakv"
    paper = "Feng et al. 2024, Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation (arXiv:2407.11550)"
    summary = "SnapKV votes; the layer's budget shared across heads adaptively"

    alpha_safeguard: float = 0.2

    def validate(self):
        super().validate()
        check(self.name, "alpha_safeguard", isinstance(self.alpha_safeguard, (int, float))
              and 0 <= self.alpha_safeguard <= 1, "in [0, 1]", self.alpha_safeguard)

    def held(self, width: int, valid: torch.Tensor) -> int:
        # The budget is the layer's total (budget x heads): the tensors are as wide as the fullest head, so the
        # layer is over budget when its heads hold more than `budget` real entries on average.
        return math.ceil(valid.sum(-1).float().mean().item())

    def select(self, scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n = scores.shape
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        floor = int(self.alpha_safeguard * keep)
        if floor:
            chosen.scatter_(2, best(scores, floor), True)
        # The rest of the layer's budget goes to the best remaining votes of any head.
        rest = scores.masked_fill(chosen, float("-inf")).reshape(b, h * n)
        extra = best(rest, keep * h - floor * h)
        chosen.view(b, h * n).scatter_(1, extra, True)
        counts = chosen.sum(-1)  # [B, H]
        width = int(counts.max())
        # Chosen entries first, in stream order, then padding slots.
        order = torch.arange(n, device=scores.device).expand(b, h, n)
        idx = torch.where(chosen, order, order + n).sort(dim=-1).values[..., :width] % n
        slot_valid = torch.arange(width, device=scores.device) < counts.unsqueeze(-1)
        return idx, slot_valid
