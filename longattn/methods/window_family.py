"""The window family (sliding_window, sink_window, dilated): one LocalPattern per method, from which its attention,
its pattern over a compressed KV cache, its sequence-parallel block pattern and its pair counts all derive."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..kernels.gathered import LOCAL_BACKENDS, local_attention
from ..kernels.masks import MaskFn, dilated_window, sinks_and_window, sliding_window
from .base import AttendCall, AttentionMethod, check, size_for_density


@dataclass(frozen=True)
class LocalPattern:
    """Causal attention to `window` keys spaced `dilation` apart (the query's own key first), plus each row's first
    `sink_tokens` real tokens."""

    window: int
    sink_tokens: int = 0
    dilation: int = 1

    def __post_init__(self):
        if self.dilation > 1 and self.sink_tokens:
            raise ValueError("LocalPattern: sinks with a dilated window are not implemented")

    @property
    def span(self) -> int:
        """How far back the farthest windowed key can be."""
        return self.window * self.dilation

    @property
    def plain(self) -> bool:
        """A plain sliding window (what the model's own sliding-window masks and flash-attn express)."""
        return self.dilation == 1 and not self.sink_tokens

    @property
    def beyond_plain(self) -> str:
        """What makes it more than a plain window ("" for a plain one), for error messages."""
        return "dilation" if self.dilation > 1 else "sinks" if self.sink_tokens else ""

    def mask_function(self, first_token=None) -> MaskFn:
        """Over absolute positions; `first_token` [B]: each row's first real token (where its sinks start)."""
        if self.dilation > 1:
            return dilated_window(self.window, self.dilation)
        if self.sink_tokens:
            return sinks_and_window(self.sink_tokens, self.window, first_token)
        return sliding_window(self.window)

    def pair_count(self, mask) -> int:
        return mask.pair_count(self.window, sink_tokens=self.sink_tokens, dilation=self.dilation)

    def block_pattern(self):
        """The pattern for sequence parallelism, judged per (query run, key run) block from the run bounds. Sinks
        there are the first positions of the sequence: sequence parallelism refuses padding, so they are each
        row's first real tokens."""
        from ..parallel.patterns import BlockPattern, MaskBlockPattern

        if self.dilation > 1:  # judged by evaluating the predicate over each block
            return MaskBlockPattern(self.mask_function(), window=self.span)
        return BlockPattern(window=self.window, sink_tokens=self.sink_tokens)


@dataclass
class WindowMethod(AttentionMethod):
    """Base of the window family. A subclass names its paper, adds its own fields and says which LocalPattern they
    make (`local_pattern`); validation, attention, KV-cache pattern, sequence-parallel pattern and pair counts are
    here, once.

    Parameters (every member)
    -------------------------
    window : int
        Keys each query attends to within its window (>= 1), its own included.
    density : float or None
        Target attention density (attended / causal pairs) in (0, 1]; sets `window` to the smallest window that
        reaches it over `density_length` tokens (give window or density, not both).
    density_length : int or None
        Sequence length at which `density` is met (the window is fixed from then on: prefill = decode).
    backend : str
        "gathered" (gathers only the keys in reach: work ~ S x window), a dense kernel with the pattern as a
        mask ("sdpa", "flex", "math"; "flash" for a plain window), or "auto" (gathered when that skips at least
        half of the keys).
    """

    learned_sinks: ClassVar[bool] = True  # honours a model's learned sink logits (s_aux)

    window: int = 1024
    density: float | None = None
    density_length: int | None = None
    backend: str = "auto"

    def local_pattern(self, window: int | None = None) -> LocalPattern:
        """The method's pattern (with another window while `density` is being resolved)."""
        raise NotImplementedError

    def validate_fields(self) -> None:
        """Checks of the subclass's own fields (before the window is resolved from a density)."""

    def validate(self):
        self.validate_fields()
        default = type(self).__dataclass_fields__["window"].default
        size_for_density(self, "window", default, lambda w, mask: self.local_pattern(w).pair_count(mask),
                         hint=f", e.g. with dilation {self.local_pattern().dilation}")
        check(self.name, "window", isinstance(self.window, int) and self.window >= 1, "an integer >= 1",
              self.window)
        extra = self.local_pattern().beyond_plain
        backends = [b for b in LOCAL_BACKENDS if not extra or b != "flash"]
        check(self.name, "backend", self.backend in backends,
              f"one of {', '.join(backends)}" + (f" (flash-attn cannot express {extra})" if extra else ""),
              self.backend)

    def computed_pairs(self, mask) -> int:
        return self.local_pattern().pair_count(mask)

    def position_pattern(self, first_token=None):
        return self.local_pattern().mask_function(first_token)

    def block_pattern(self):
        return self.local_pattern().block_pattern()

    def attend(self, query, key, value, mask, call: AttendCall):
        p = self.local_pattern()
        first = mask.first_real_token() if p.sink_tokens else None
        pattern = mask.restrict(p.mask_function(first), window=p.window if p.plain else None, cache_key=repr(self))
        return local_attention(query, key, value, pattern, span=p.span, sinks=p.sink_tokens, first_token=first,
                               dilation=p.dilation, backend=self.backend, scale=call.scale, softcap=call.softcap,
                               dropout=call.dropout, translation_invariant=mask.structured,
                               learned_sinks=call.learned_sinks)
