"""Dilated (strided) 1-D neighborhood attention."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.gathered import LOCAL_BACKENDS, local_attention
from ..kernels.masks import dilated_window
from .base import AttendCall, AttentionMethod, check, window_for_density


@dataclass
class Dilated(AttentionMethod):
    """Causal neighborhood attention to `window` keys spaced `dilation` apart (Hassani & Shi 2022, Dilated
    Neighborhood Attention Transformer, arXiv:2209.15001; 1-D causal form as in Longformer's dilated window).

    Parameters
    ----------
    window : int
        Number of keys each query attends to (>= 1), the query itself first.
    dilation : int
        Gap between attended keys (>= 1; 1 is a plain sliding window).
    density : float or None
        Target attention density (attended / causal pairs) in (0, 1]; sets `window` to the smallest window that
        reaches it over `density_length` tokens (give window or density, not both).
    density_length : int or None
        Sequence length at which `density` is met (the window is fixed from then on: prefill = decode).
    backend : str
        "gathered" (gathers only the keys in reach: work ~ S x window), a dense kernel with the pattern as a
        mask ("sdpa", "flex", "math"), or "auto" (gathered when that skips at least half of the keys).
    """

    name = "dilated"
    paper = "Hassani & Shi 2022, Dilated Neighborhood Attention Transformer (arXiv:2209.15001)"
    summary = "`window` keys spaced `dilation` apart, causal"
    learned_sinks = True  # honours a model's learned sink logits (s_aux)

    window: int = 512
    density: float | None = None
    density_length: int | None = None
    dilation: int = 2
    backend: str = "auto"

    def validate(self):
        window_for_density(self, 512, dilation=self.dilation)
        for name in ("window", "dilation"):
            value = getattr(self, name)
            check(self.name, name, isinstance(value, int) and value >= 1, "an integer >= 1", value)
        check(self.name, "backend", self.backend in LOCAL_BACKENDS and self.backend != "flash",
              "one of auto, gathered, sdpa, flex, math (flash-attn cannot express dilation)", self.backend)

    def computed_pairs(self, mask) -> int:
        return mask.pair_count(self.window, dilation=self.dilation)

    def position_pattern(self, first_token=None):
        return dilated_window(self.window, self.dilation)

    def attend(self, query, key, value, mask, call: AttendCall):
        pattern = mask.restrict(dilated_window(self.window, self.dilation), cache_key=repr(self))
        return local_attention(query, key, value, pattern, span=self.window * self.dilation,
                               backend=self.backend, scale=call.scale, softcap=call.softcap, dropout=call.dropout,
                               translation_invariant=mask.structured, dilation=self.dilation,
                               learned_sinks=call.learned_sinks)
