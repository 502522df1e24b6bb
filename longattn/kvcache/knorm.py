"""KNorm: keep the keys with the smallest L2 norm."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVPolicy, ScoreInput


@dataclass
class KNorm(KVPolicy):
    """Key-norm eviction (Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression, arXiv:2406.11430): a low key norm goes with high attention, so each KV head keeps its
    lowest-norm keys. Needs no attention scores.

    Parameters
    ----------
    kv_budget, compression_ratio
        See KVPolicy.
    """

    name = "knorm"
    paper = "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (arXiv:2406.11430)"
    summary = "keep the keys with the lowest L2 norm, per KV head"

    def score(self, inp: ScoreInput) -> torch.Tensor:
        return -inp.keys.float().norm(dim=-1)
