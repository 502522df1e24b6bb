"""Attention patterns over absolute positions, judged one (query run, key run) block at a time.

A run is a contiguous range of absolute positions ``(start, length)``. Sequence-parallel attention sees the
sequence as runs spread over ranks; for each pair of runs it asks the pattern whether the block is empty
(skipped: no compute, the reason ring steps of a causal or windowed pattern cost nothing), full (no mask at
all) or partial (a boolean mask over the block, or the kernel's own causal switch on a diagonal block).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..kernels.masks import sinks_and_window

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

    def block_mask(self, q_run: Run, k_run: Run, device="cpu") -> torch.Tensor:
        """[q_len, k_len] bool mask of a PARTIAL block (True = attend)."""
        q = torch.arange(q_run[0], q_run[0] + q_run[1], device=device)
        k = torch.arange(k_run[0], k_run[0] + k_run[1], device=device)
        return self.allowed(q, k)

    def with_window(self, window: int) -> "BlockPattern | MaskBlockPattern":
        """This pattern within a causal sliding window of `window` keys too (a model's own sliding window, which
        hides sinks beyond it: the single-process mask is the same intersection)."""
        return _within_window(self, window)


@dataclass(frozen=True)
class MaskBlockPattern:
    """Any causal pattern given as a predicate `fn(batch, head, q_pos, k_pos)` over absolute positions (a
    kernels.masks MaskFn, called with batch and head 0), optionally within a sliding `window`: each block is
    classified by evaluating the predicate over it (once per block, cached), so a method that can write its
    pattern as a predicate runs sequence-parallel without a pattern of its own here."""

    fn: Callable
    window: int | None = None

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        q, k = q_pos.view(-1, 1), k_pos.view(1, -1)
        zero = torch.zeros((), dtype=torch.long, device=q_pos.device)
        ok = (k <= q) & self.fn(zero, zero, q, k)
        if self.window is not None:
            ok = ok & (q - k < self.window)
        return ok

    def classify(self, q_run: Run, k_run: Run) -> str:
        (q0, qn), (k0, kn) = q_run, k_run
        if k0 > q0 + qn - 1 or (self.window is not None and q0 - (k0 + kn - 1) >= self.window):
            return EMPTY  # no predicate call: every key is after every query, or out of the window
        block = _evaluated_block(self, q_run, k_run)
        if not bool(block.any()):
            return EMPTY
        if bool(block.all()):
            return FULL
        if q_run == k_run and torch.equal(block, torch.ones_like(block).tril()):
            return CAUSAL_DIAGONAL
        return PARTIAL

    def block_mask(self, q_run: Run, k_run: Run, device="cpu") -> torch.Tensor:
        return _evaluated_block(self, q_run, k_run).to(device)

    def with_window(self, window: int) -> "MaskBlockPattern":
        return replace(self, window=window if self.window is None else min(self.window, window))


@functools.lru_cache(maxsize=64)  # one object per (pattern, window): the block cache below then serves every layer
def _within_window(pattern: BlockPattern, window: int):
    if not pattern.causal:
        raise ValueError("BlockPattern: a sliding window needs a causal pattern")
    if pattern.window is None or window <= pattern.window or not pattern.sink_tokens:
        return BlockPattern(window=window if pattern.window is None else min(pattern.window, window))
    # sinks, a window, and a wider model window that the sinks beyond it fall out of: no run-bound form
    return MaskBlockPattern(sinks_and_window(pattern.sink_tokens, pattern.window), window=window)


@functools.lru_cache(maxsize=32)  # every layer, forward and backward, asks for the same blocks
def _evaluated_block(pattern: MaskBlockPattern, q_run: Run, k_run: Run) -> torch.Tensor:
    return pattern.allowed(torch.arange(q_run[0], q_run[0] + q_run[1]), torch.arange(k_run[0], k_run[0] + k_run[1]))


CAUSAL = BlockPattern()
NON_CAUSAL = BlockPattern(causal=False)


def run_positions(runs: list[Run], device="cpu") -> torch.Tensor:
    """The absolute positions of consecutive runs, in order."""
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in runs])

