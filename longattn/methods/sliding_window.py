"""Sliding-window attention: each query sees only the most recent `window` keys."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.gathered import LOCAL_BACKENDS, local_attention
from ..kernels.masks import sliding_window
from .base import AttendCall, AttentionMethod, check, window_for_density


@dataclass
class SlidingWindow(AttentionMethod):
    """Local causal attention over the last `window` positions (Beltagy et al. 2020, Longformer, arXiv:2004.05150).

    The window is intersected with the model's own mask (padding, and the model's own sliding window if it has
    one), in prefill and in decode alike, so token-by-token decoding equals one prefill pass.

    Parameters
    ----------
    window : int
        Number of most recent positions each query attends to, its own included (>= 1).
    density : float or None
        Target attention density (attended / causal pairs) in (0, 1]; sets `window` to the smallest window that
        reaches it over `density_length` tokens (give window or density, not both).
    density_length : int or None
        Sequence length at which `density` is met (the window is fixed from then on: prefill = decode).
    backend : str
        "gathered" (gathers only the keys in reach: work ~ S x window), a dense kernel with the pattern as a
        mask ("sdpa", "flex", "flash", "math"), or "auto" (gathered when that skips at least half the keys).
    """

    name = "sliding_window"
    paper = "Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)"
    summary = "causal attention to the `window` most recent tokens"
    learned_sinks = True  # honours a model's learned sink logits (s_aux)

    window: int = 1024
    density: float | None = None
    density_length: int | None = None
    backend: str = "auto"

    def validate(self):
        window_for_density(self, 1024)
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
                               translation_invariant=mask.structured, learned_sinks=call.learned_sinks)
