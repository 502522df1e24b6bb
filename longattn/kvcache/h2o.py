"""H2O: keep the heavy hitters (most attention received so far) plus the most recent tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..methods.base import check
from .base import KVPolicy, ScoreInput, protect_recent


@dataclass
class H2O(KVPolicy):
    """Heavy-Hitter Oracle (Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models, arXiv:2306.14048): every entry accumulates the attention it receives from every query
    (prompt queries included, summed over the query heads of its KV head); each KV head keeps the
    `recent_window` newest tokens plus the entries with the largest accumulated attention.

    Parameters
    ----------
    recent_window : int or None
        Newest tokens always kept; None = half the budget (the paper's equal split).
    kv_budget, compression_ratio
        See KVPolicy.
    """

    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (arXiv:2306.14048)"
    summary = "keep heavy hitters (accumulated attention) + recent tokens"
    stateful = True

    recent_window: int | None = None

    def validate(self):
        super().validate()
        check(self.name, "recent_window", self.recent_window is None or (
            isinstance(self.recent_window, int) and self.recent_window >= 0), "None or an integer >= 0",
            self.recent_window)

    def observe(self, inp: ScoreInput) -> torch.Tensor:
        """Add the attention every entry receives from this forward's queries to its accumulated total."""
        acc = inp.entry_state.get("accumulated")
        n = inp.keys.shape[-2]
        acc = torch.zeros(inp.keys.shape[:3], device=inp.keys.device) if acc is None else \
            F.pad(acc, (0, n - acc.shape[-1]))
        acc = acc + inp.attention_probs()  # chunked over queries: the prompt never holds S x S scores
        inp.entry_state["accumulated"] = acc
        return acc

    def score(self, inp: ScoreInput) -> torch.Tensor:
        acc = self.observe(inp)
        n = inp.keys.shape[-2]
        if self.recent_window is not None:
            recent = self.recent_window
        else:
            budget = self.kv_budget if self.kv_budget is not None else math.ceil(n * (1 - self.compression_ratio))
            recent = budget // 2

        return protect_recent(acc, inp, recent)
