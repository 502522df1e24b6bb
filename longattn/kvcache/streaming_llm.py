"""StreamingLLM: keep the first tokens (attention sinks) and a window of the most recent ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import check
from .base import KVPolicy, ScoreInput


@dataclass
class StreamingLLM(KVPolicy):
    """Sinks + recent window eviction (Xiao et al. 2023, Efficient Streaming Language Models with Attention
    Sinks, arXiv:2309.17453). As in the paper, distances are distances in the cache: a query sees each kept key
    as far away as the number of kept tokens between them, so attention never spans more positions than the
    model was trained on. Since RoPE scores depend only on position differences, this is done by turning the
    sink keys forward by the number of tokens evicted after them (the window and the queries keep their text
    positions): O(sink_tokens) work per eviction.

    Parameters
    ----------
    sink_tokens : int
        First real tokens of each sequence that are always kept (>= 0; 0 = window-only eviction).
    window : int or None
        Most recent tokens kept; None = kv_budget - sink_tokens.
    kv_budget : int or None
        sink_tokens + window (give either this or window).
    compression_ratio : float or None
        Fraction of the prompt evicted after prefill.
    shift_positions : bool
        Cache distances (the paper's method); False keeps text distances (the sinks drift ever further away).
    """

    name = "streaming_llm"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    summary = "keep sink tokens + a recent window; positions within the cache"

    sink_tokens: int = 4
    window: int | None = None
    shift_positions: bool = True

    def __post_init__(self):
        check(self.name, "sink_tokens", isinstance(self.sink_tokens, int) and self.sink_tokens >= 0,
              "an integer >= 0", self.sink_tokens)
        check(self.name, "window", self.window is None or (isinstance(self.window, int) and self.window >= 1),
              "None or an integer >= 1", self.window)
        if self.kv_budget is not None and self.kv_budget < self.sink_tokens:
            raise ValueError(f"{self.name}: kv_budget ({self.kv_budget}) is smaller than sink_tokens "
                             f"({self.sink_tokens}); the budget must hold the sinks")
        if self.window is not None:
            if self.kv_budget is not None and self.kv_budget != self.sink_tokens + self.window:
                raise ValueError(f"{self.name}: kv_budget ({self.kv_budget}) must equal sink_tokens + window "
                                 f"({self.sink_tokens} + {self.window}); give one of kv_budget and window")
            self.kv_budget = self.sink_tokens + self.window
        super().__post_init__()

    @property
    def shifts_positions(self) -> bool:
        return self.shift_positions

    def score(self, inp: ScoreInput) -> torch.Tensor:
        # Recency, with the first `sink_tokens` real tokens of each sequence pinned.
        rank = inp.valid.long().cumsum(-1) - 1
        sink = inp.valid & (rank < self.sink_tokens)
        return inp.token_index.float().masked_fill(sink, float("inf"))
