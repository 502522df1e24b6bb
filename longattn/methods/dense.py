"""Dense attention through longattn: the exact baseline every other method is measured against."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.dense import BACKENDS, dense_attention
from ..kernels.masks import causal
from .base import AttendCall, AttentionMethod, check


@dataclass
class Dense(AttentionMethod):
    """Full softmax attention (Vaswani et al. 2017, "Attention Is All You Need", arXiv:1706.03762).

    Parameters
    ----------
    backend : str
        "auto" (flash-attn on CUDA when installed, SDPA otherwise, FlexAttention or the math kernel for
        logit soft-capping), or one of "sdpa", "flex", "flash", "math".
    """

    name = "dense"
    paper = "Vaswani et al. 2017, Attention Is All You Need (arXiv:1706.03762)"
    summary = "exact full attention (baseline); backends sdpa / flex / flash / math"
    learned_sinks = True  # honours a model's learned sink logits (s_aux)

    backend: str = "auto"

    def validate(self):
        check(self.name, "backend", self.backend in BACKENDS, f"one of {list(BACKENDS)}", self.backend)

    def attend(self, query, key, value, mask, call: AttendCall):
        return dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap,
                               dropout=call.dropout, backend=self.backend, learned_sinks=call.learned_sinks)

    def block_pattern(self):
        from ..parallel.patterns import CAUSAL

        return CAUSAL

    def position_pattern(self, first_token=None):
        return causal
