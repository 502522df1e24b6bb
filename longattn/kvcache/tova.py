"""TOVA: evict the entries the newest query attends to least, averaged over the layer's heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KVPolicy, ScoreInput


@dataclass
class TOVA(KVPolicy):
    """Token Omission Via Attention (Oren et al. 2024, Transformers are Multi-State RNNs, arXiv:2401.06104):
    score each entry by the attention the last query gives it, averaged over all heads of the layer, and keep
    the best, the same entries for every head. During decoding this drops the lowest-scored entry each step;
    a prompt is cut in one go by its last token's attention.

    Parameters
    ----------
    kv_budget, compression_ratio
        See KVPolicy.
    """

    name = "tova"
    paper = "Oren et al. 2024, Transformers are Multi-State RNNs (arXiv:2401.06104)"
    summary = "keep what the newest query attends to most (head-averaged)"

    def score(self, inp: ScoreInput) -> torch.Tensor:
        last = inp.attention_probs(inp.query[:, :, -1:], inp.query_tokens()[:, :, -1:], reduce="mean")
        return last.mean(1, keepdim=True).expand_as(last)
