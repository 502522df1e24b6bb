"""Attention sinks plus a sliding window ("A-shape"): the StreamingLLM attention pattern."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.gathered import LOCAL_BACKENDS, local_attention
from ..kernels.masks import sinks_and_window
from .base import AttendCall, AttentionMethod, check, window_for_density


@dataclass
class SinkWindow(AttentionMethod):
    """Each query attends to the first `sink_tokens` tokens and the `window` most recent ones (Xiao et al.
    2023, Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453).

    Sinks are the first real tokens of each sequence (left padding is skipped). This is the attention
    pattern over a full cache; evicting the cache to the same budget is the kvcache "streaming_llm" policy.

    Parameters
    ----------
    sink_tokens : int
        Initial tokens every query keeps attending to (>= 0; 4 in the paper).
    window : int
        Most recent positions each query attends to, its own included (>= 1).
    density : float or None
        Target attention density (attended / causal pairs) in (0, 1]; sets `window` to the smallest window that
        reaches it over `density_length` tokens (give window or density, not both).
    density_length : int or None
        Sequence length at which `density` is met (the window is fixed from then on: prefill = decode).
    backend : str
        "gathered" (gathers only the keys in reach: work ~ S x window), a dense kernel with the pattern as a
        mask ("sdpa", "flex", "math"), or "auto" (gathered when that skips at least half of the keys).
    """

    name = "sink_window"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    summary = "first `sink_tokens` tokens + the `window` most recent (A-shape)"
    learned_sinks = True  # honours a model's learned sink logits (s_aux)

    sink_tokens: int = 4
    window: int = 1024
    density: float | None = None
    density_length: int | None = None
    backend: str = "auto"

    def validate(self):
        window_for_density(self, 1024, sink_tokens=self.sink_tokens)
        check(self.name, "sink_tokens", isinstance(self.sink_tokens, int) and self.sink_tokens >= 0,
              "an integer >= 0", self.sink_tokens)
        check(self.name, "window", isinstance(self.window, int) and self.window >= 1, "an integer >= 1",
              self.window)
        check(self.name, "backend", self.backend in LOCAL_BACKENDS and self.backend != "flash",
              "one of auto, gathered, sdpa, flex, math (flash-attn cannot express sinks)", self.backend)

    def computed_pairs(self, mask) -> int:
        return mask.pair_count(self.window, sink_tokens=self.sink_tokens)

    def position_pattern(self, first_token=None):
        return sinks_and_window(self.sink_tokens, self.window, first_token)

    def attend(self, query, key, value, mask, call: AttendCall):
        first = mask.first_real_token()
        pattern = mask.restrict(sinks_and_window(self.sink_tokens, self.window, first), cache_key=repr(self))
        return local_attention(query, key, value, pattern, span=self.window, sinks=self.sink_tokens,
                               first_token=first, backend=self.backend, scale=call.scale, softcap=call.softcap,
                               dropout=call.dropout, translation_invariant=mask.structured,
                               learned_sinks=call.learned_sinks)
