"""Attention patterns over absolute positions, judged one (query run, key run) block at a time.

A run is a contiguous range of absolute positions ``(start, length)``. Sequence-parallel attention sees the
sequence as runs spread over ranks; for each pair of runs it asks the pattern whether the block is empty
(skipped: no compute, the reason ring steps of a causal or windowed pattern cost nothing), full (no mask at
all) or partial (a boolean mask over the block, or the kernel's own causal switch on a diagonal block).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Run = tuple[int, int]  # (first absolute position, number of positions)

EMPTY, FULL, CAUSAL_DIAGONAL, PARTIAL = "empty", "full", "causal_diagonal", "partial"


@dataclass(frozen=True)
class BlockPattern:
    """Which (query, key) absolute positions may interact: full (not causal), causal, causal within a
    sliding `window` (the query itself included), plus `sink_tokens` first positions every query sees."""

    causal: bool = True
    window: int | None = None
    sink_tokens: int = 0

    def __post_init__(self):
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"BlockPattern: window must be None or an integer >= 1, got {self.window!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"BlockPattern: sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if not self.causal and (self.window is not None or self.sink_tokens):
            raise ValueError("BlockPattern: a window or sink tokens need causal=True")
        if self.sink_tokens and self.window is None:
            raise ValueError("BlockPattern: sink_tokens without a window is plain causal attention; set window")

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The slow, obvious predicate: bool tensor broadcast over q_pos[:, None] and k_pos[None, :]."""
        q, k = q_pos.view(-1, 1), k_pos.view(1, -1)
        if not self.causal:
            return torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q_pos.device)
        ok = k <= q
        if self.window is not None:
            ok = ok & ((q - k < self.window) | (k < self.sink_tokens))
        return ok

    def classify(self, q_run: Run, k_run: Run) -> str:
        """EMPTY, FULL, CAUSAL_DIAGONAL (same run, plain causal) or PARTIAL, from the run bounds alone."""
        if not self.causal:
            return FULL
        (q0, qn), (k0, kn) = q_run, k_run
        q1, k1 = q0 + qn - 1, k0 + kn - 1  # last positions (inclusive)
        if k0 > q1:
            return EMPTY  # every key is after every query
        if self.window is None:
            if k1 <= q0:
                return FULL
            return CAUSAL_DIAGONAL if q_run == k_run else PARTIAL
        in_window_empty = q0 - k1 >= self.window  # the nearest pair is already out of the window
        sinks_empty = k0 >= self.sink_tokens
        if in_window_empty and sinks_empty:
            return EMPTY
        in_window_full = k1 <= q0 and q1 - k0 < self.window
        all_sinks = k1 < self.sink_tokens and k1 <= q0
        return FULL if in_window_full or all_sinks else PARTIAL

    def pair_count(self, q_run: Run, k_run: Run) -> int:
        """Allowed (query, key) pairs of a block, from the run bounds in O(query run) arithmetic (no mask):
        the numerator of attention density under sequence parallelism."""
        (q0, qn), (k0, kn) = q_run, k_run
        if not self.causal:
            return qn * kn
        q = torch.arange(q0, q0 + qn, dtype=torch.long)
        hi = q.clamp(max=k0 + kn - 1)  # last allowed key: causal, and inside the key run
        if self.window is None:
            return int((hi - k0 + 1).clamp_min(0).sum())
        lo = (q - self.window + 1).clamp(min=k0)  # first key inside the window
        sink_hi = torch.minimum(hi, lo - 1).clamp(max=self.sink_tokens - 1)  # sinks left of the window
        return int((hi - lo + 1).clamp_min(0).sum() + (sink_hi - k0 + 1).clamp_min(0).sum())

    def block_mask(self, q_run: Run, k_run: Run, device="cpu") -> torch.Tensor:
        """[q_len, k_len] bool mask of a PARTIAL block (True = attend)."""
        q = torch.arange(q_run[0], q_run[0] + q_run[1], device=device)
        k = torch.arange(k_run[0], k_run[0] + k_run[1], device=device)
        return self.allowed(q, k)


CAUSAL = BlockPattern()
NON_CAUSAL = BlockPattern(causal=False)


def run_positions(runs: list[Run], device="cpu") -> torch.Tensor:
    """The absolute positions of consecutive runs, in order."""
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in runs])

