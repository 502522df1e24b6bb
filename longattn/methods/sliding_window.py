"""Sliding-window attention: each query sees only the most recent `window` keys."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.gathered import LOCAL_BACKENDS, local_attention
from ..kernels.masks import sliding_window
from .base import AttendCall, AttentionMethod, check


@dataclass
class SlidingWindow(AttentionMethod):
    """Local causal attention over the last `window` positions (Beltagy et al. 2020, Longformer, arXiv:2004.05150).

    The window is intersected with the model's own mask (padding, and the model's own sliding window if it has
    one), in prefill and in decode alike, so token-by-token decoding equals one prefill pass.

    Parameters
    ----------
    window : int
        Number of most recent positions each query attends to, its own included (>= 1).
    backend : str
        "gathered" (gathers only the keys in reach: work ~ S x window), a dense kernel with the pattern as a
        mask ("sdpa", "flex", "flash", "math"), or "auto" (gathered when that skips at least half the keys).
    """

    name = "sliding_window"
    paper = "Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)"
    summary = "causal attention to the `window` most recent tokens"

    window: int = 1024
    backend: str = "auto"

    def validate(self):
        check(self.name, "window", isinstance(self.window, int) and self.window >= 1, "an integer >= 1",
              self.window)
        check(self.name, "backend", self.backend in LOCAL_BACKENDS, f"one of {list(LOCAL_BACKENDS)}",
              self.backend)

    def computed_pairs(self, mask) -> int:
        return mask.pair_count(self.window)

    def position_pattern(self, first_token=None):
        return sliding_window(self.window)

    def attend(self, query, key, value, mask, call: AttendCall):
        windowed = mask.restrict(sliding_window(self.window), window=self.window, cache_key=repr(self))
        return local_attention(query, key, value, windowed, span=self.window, backend=self.backend,
                               scale=call.scale, softcap=call.softcap, dropout=call.dropout,
                               translation_invariant=mask.is_plain())
