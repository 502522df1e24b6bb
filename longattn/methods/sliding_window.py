"""Sliding-window attention: each query sees only the most recent `window` keys."""
from __future__ import annotations

from dataclasses import dataclass

from .window_family import LocalPattern, WindowMethod


@dataclass
class SlidingWindow(WindowMethod):
    """Local causal attention over the last `window` positions (Beltagy et al. 2020, Longformer, arXiv:2004.05150).

    The window is intersected with the model's own mask (padding, and the model's own sliding window if it has
    one), in prefill and in decode alike, so token-by-token decoding equals one prefill pass. Parameters: window,
    density, density_length, backend (see WindowMethod).
    """

    name = "sliding_window"
    paper = "Beltagy et al. 2020, Longformer: The Long-Document Transformer (arXiv:2004.05150)"
    summary = "causal attention to the `window` most recent tokens"

    def local_pattern(self, window=None):
        return LocalPattern(self.window if window is None else window)
