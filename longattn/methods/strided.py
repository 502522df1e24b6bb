"""The Sparse Transformer's strided pattern."""
from __future__ import annotations

from dataclasses import dataclass

from .base import check
from .positional import PositionalMethod


@dataclass
class Strided(PositionalMethod):
    """The `window` most recent keys plus every `stride`-th key before them, counting back from the query (Child
    et al. 2019, Generating Long Sequences with Sparse Transformers, arXiv:1904.10509: the strided pattern with
    its two heads merged into one; the paper uses window = stride ~ sqrt(sequence length)).

    Parameters: window (>= 1, the query itself included), stride (>= 1), backend (see PositionalMethod).
    """

    name = "strided"
    paper = "Child et al. 2019, Generating Long Sequences with Sparse Transformers (arXiv:1904.10509)"
    summary = "the `window` most recent keys + every `stride`-th key before them"

    window: int = 128
    stride: int = 128

    def validate_fields(self):
        for field in ("window", "stride"):
            value = getattr(self, field)
            check(self.name, field, isinstance(value, int) and value >= 1, "an integer >= 1", value)

    def allows(self, q, k):
        return (q - k < self.window) | ((q - k) % self.stride == 0)
