"""Dynamic Key-Distributed GQA: the query-head allocation follows key-head norms tracked during training."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.dense import BACKENDS
from .base import AttendCall, AttentionMethod, check
from .key_driven_gqa import allocate, allocated_attention, head_to_kv, key_head_norms, uniform_counts

STATE_ATTR = "_longattn_dgqa"  # per attention module: {"ema": [Hkv], "counts": [Hkv], "step": int}


@dataclass
class DynamicGQA(AttentionMethod):
    """DGQA (Khan et al. 2024, Key-Driven Grouped Query Attention, arXiv:2408.08454, §3): like KDGQA, but the
    allocation comes from key-head norms as they evolve through training. In training mode, every `window`
    forward passes of a layer, the batch's key-head norms m (Frobenius, summed over the batch) update an
    exponential moving average c <- beta * m + (1 - beta) * c (c starts at 0) and the allocation is
    recomputed: proportional to c ("ema"), or to |m - c_previous|, how far each head's norm moved ("diff").
    Shares are rounded and repaired to total Hq; query heads are taken in order. The state lives on each
    attention module (attribute `_longattn_dgqa`) and changes in training mode only; in eval mode the last
    allocation is used as a static grouping (uniform GQA before any training step), so decoding equals a
    prefill pass.

    The authors' code keeps c as (c + m) / window instead of a moving average, and breaks rounding ties at
    random; we use the moving average the paper describes and deterministic repairs (largest loses first).

    Parameters
    ----------
    kind : str
        "ema" or "diff" (the paper's two variants).
    beta : float
        Weight of the newest norms in the moving average, in (0, 1] (0.9 in the authors' code).
    window : int
        Training forward passes between allocation updates (>= 1).
    backend : str
        Dense kernel ("auto", "sdpa", "flex", "flash", "math").
    """

    name = "dgqa"
    paper = "Khan et al. 2024, Key-Driven Grouped Query Attention (arXiv:2408.08454)"
    summary = "query heads allocated by key-head norms tracked (EMA) during training; static at inference"

    kind: str = "ema"
    beta: float = 0.9
    window: int = 1
    backend: str = "auto"

    def validate(self):
        check(self.name, "kind", self.kind in ("ema", "diff"), "'ema' or 'diff'", self.kind)
        check(self.name, "beta", isinstance(self.beta, (int, float)) and 0 < self.beta <= 1, "in (0, 1]",
              self.beta)
        check(self.name, "window", isinstance(self.window, int) and self.window >= 1, "an integer >= 1",
              self.window)
        check(self.name, "backend", self.backend in BACKENDS, f"one of {list(BACKENDS)}", self.backend)

    @staticmethod
    def state(module, heads: int, kv_heads: int) -> dict:
        st = getattr(module, STATE_ATTR, None)
        if st is None or st["ema"].numel() != kv_heads:
            st = {"ema": torch.zeros(kv_heads, dtype=torch.float64), "counts": uniform_counts(heads, kv_heads),
                  "step": 0}
            setattr(module, STATE_ATTR, st)
        return st

    def update(self, st: dict, key, mask, heads: int) -> None:
        """One training forward pass: maybe move the average and re-allocate."""
        if st["step"] % self.window == 0:
            m = key_head_norms(key, mask, per_sequence=False).double().cpu()
            previous = st["ema"]
            st["ema"] = self.beta * m + (1 - self.beta) * previous
            weights = st["ema"] if self.kind == "ema" else (m - previous).abs()
            st["counts"] = allocate(weights, heads, min_max=False)
        st["step"] += 1

    def attend(self, query, key, value, mask, call: AttendCall):
        heads = query.shape[1]
        if call.module is None:
            raise ValueError(f"{self.name}: needs the attention module to keep its state (call through patch)")
        st = self.state(call.module, heads, key.shape[1])
        if call.module.training:
            self.update(st, key, mask, heads)
        return allocated_attention(query, key, value, mask, head_to_kv(st["counts"]), call, self.backend)
