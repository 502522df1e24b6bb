"""Dilated (strided) 1-D neighborhood attention."""
from __future__ import annotations

from dataclasses import dataclass

from .base import check
from .window_family import LocalPattern, WindowMethod


@dataclass
class Dilated(WindowMethod):
    """Causal neighborhood attention to `window` keys spaced `dilation` apart (Hassani & Shi 2022, Dilated
    Neighborhood Attention Transformer, arXiv:2209.15001; 1-D causal form as in Longformer's dilated window).

    Parameters: dilation (gap between attended keys, >= 1; 1 is a plain sliding window), and window (keys
    attended, the query itself first), density, density_length, backend (see WindowMethod).
    """

    name = "dilated"
    paper = "Hassani & Shi 2022, Dilated Neighborhood Attention Transformer (arXiv:2209.15001)"
    summary = "`window` keys spaced `dilation` apart, causal"

    window: int = 512
    dilation: int = 2

    def validate_fields(self):
        check(self.name, "dilation", isinstance(self.dilation, int) and self.dilation >= 1, "an integer >= 1",
              self.dilation)

    def local_pattern(self, window=None):
        return LocalPattern(self.window if window is None else window, dilation=self.dilation)
