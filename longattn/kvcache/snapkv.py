"""SnapKV: the last queries of the prompt vote (pooled attention) for the entries each head keeps."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..methods.base import check
from .base import KVPolicy, ScoreInput, protect_recent


@dataclass
class SnapKV(KVPolicy):
    """Observation-window voting (Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before
    Generation, arXiv:2404.14469): the attention of the last `window` queries, summed over them (and over the
    query heads of each KV head), smoothed by 1-D pooling over neighbouring positions, picks each head's
    entries; the window itself is always kept. In decoding with a bounded budget the observation window is the
    last `window` queries seen so far (kept per layer), so the same vote keeps running.

    Parameters
    ----------
    window : int
        Observation window: number of most recent queries that vote, and recent tokens always kept (>= 1).
    kernel_size : int
        Pooling kernel over positions (odd, >= 1; 1 = no pooling).
    pooling : str
        "max" or "avg".
    kv_budget, compression_ratio
        See KVPolicy.
    """

    name = "snapkv"
    paper = "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation (arXiv:2404.14469)"
    summary = "observation-window attention votes, pooled, per head"
    stateful = True  # remembers the last `window` queries for decoding

    window: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    def validate(self):
        super().validate()
        check(self.name, "window", isinstance(self.window, int) and self.window >= 1, "an integer >= 1",
              self.window)
        check(self.name, "kernel_size", isinstance(self.kernel_size, int) and self.kernel_size >= 1
              and self.kernel_size % 2 == 1, "an odd integer >= 1", self.kernel_size)
        check(self.name, "pooling", self.pooling in ("max", "avg"), "'max' or 'avg'", self.pooling)

    def observation(self, inp: ScoreInput) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `window` queries seen by this layer and their stream indices (remembered across forwards)."""
        q, tok = inp.query, inp.query_tokens()
        if "queries" in inp.state and q.shape[2] < self.window:
            q = torch.cat([inp.state["queries"], q], dim=2)
            tok = torch.cat([inp.state["query_tokens"], tok], dim=2)
        q, tok = q[:, :, -self.window:], tok[:, :, -self.window:]
        inp.state["queries"], inp.state["query_tokens"] = q, tok
        return q, tok

    def observe(self, inp: ScoreInput) -> None:
        self.observation(inp)  # only the window of queries is remembered; votes are cast when evicting

    def votes(self, inp: ScoreInput) -> torch.Tensor:
        """[B, Hkv, N] pooled attention votes of the observation window."""
        q, tok = self.observation(inp)
        votes = inp.attention_probs(q, tok)
        if self.kernel_size > 1:
            b, h, n = votes.shape
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            votes = pool(votes.view(b * h, 1, n), self.kernel_size, stride=1,
                         padding=self.kernel_size // 2).view(b, h, n)
        return votes

    def score(self, inp: ScoreInput) -> torch.Tensor:
        return protect_recent(self.votes(inp), inp, self.window)
