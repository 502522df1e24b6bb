"""Base of methods whose pattern is a fixed predicate over token positions: a subclass writes `allows` once, and
its attention, its pattern over a compressed KV cache, its sequence-parallel pattern and its pair counts derive
from it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..kernels.dense import dense_attention
from ..kernels.masks import MaskFn
from .base import AttendCall, AttentionMethod, check

BACKENDS = ("auto", "sdpa", "flex", "math")  # dense kernels that take any mask (flash-attn takes windows only)


@dataclass
class PositionalMethod(AttentionMethod):
    """A causal pattern given by `allows(q, k)`: whether the query at position q sees the key at position k
    (k <= q; both counted from the sequence's first real token, so left padding changes nothing).

    Parameters (every member)
    -------------------------
    backend : str
        The dense kernel that runs the pattern as a mask: "sdpa", "flex" (skips empty blocks), "math", or "auto".
    """

    learned_sinks: ClassVar[bool] = True  # honours a model's learned sink logits (s_aux)

    backend: str = "auto"

    def allows(self, q, k):
        """Bool tensor over broadcast position tensors q and k (k <= q is already given)."""
        raise NotImplementedError

    def validate_fields(self) -> None:
        """Checks of the subclass's own fields."""

    def validate(self):
        self.validate_fields()
        check(self.name, "backend", self.backend in BACKENDS, f"one of {', '.join(BACKENDS)}", self.backend)

    def position_pattern(self, first_token=None) -> MaskFn:
        """Over absolute positions; `first_token` [B]: each row's first real token."""
        def allowed(b, h, q, k):
            start = 0 if first_token is None else first_token[b]
            return (k <= q) & self.allows(q - start, k - start)

        return allowed

    def computed_pairs(self, mask) -> int:
        key = ("pairs", repr(self))
        if key not in mask._cache:  # every layer of a forward shares the mask
            mask._cache[key] = mask.evaluated_pair_count(self.position_pattern())
        return mask._cache[key]

    def block_pattern(self):
        from ..parallel.patterns import MaskBlockPattern

        return MaskBlockPattern(self.position_pattern())

    def attend(self, query, key, value, mask, call: AttendCall):
        pattern = mask.restrict(self.position_pattern(mask.first_real_token()), cache_key=repr(self))
        return dense_attention(query, key, value, pattern, scale=call.scale, softcap=call.softcap,
                               dropout=call.dropout, backend=self.backend, learned_sinks=call.learned_sinks)
