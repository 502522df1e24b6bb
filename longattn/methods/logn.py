"""Log-length attention scaling: sharpen attention beyond the training length, training-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.dense import BACKENDS, dense_attention
from .base import AttendCall, AttentionMethod, check


@dataclass
class LogNScaling(AttentionMethod):
    """Multiply the attention logits of a query at position p by max(1, scale * log(p + 1) / log(L)), L the
    training length, so attention entropy stays level as the context grows past L (Chiang & Cholak 2022,
    Overcoming a Theoretical Limitation of Self-Attention, arXiv:2202.12172; "log-n" scaling as used by
    Qwen). Within the training length nothing changes. Attention itself is dense (any backend).

    Parameters
    ----------
    training_length : int or None
        L; None takes the model config's max_position_embeddings.
    scale : float
        Multiplier s on log(p + 1) / log(L) (> 0).
    backend : str
        Dense kernel ("auto", "sdpa", "flex", "flash", "math").
    """

    name = "logn"
    paper = "Chiang & Cholak 2022, Overcoming a Theoretical Limitation of Self-Attention (arXiv:2202.12172)"
    summary = "scale logits by log(position)/log(training length) beyond the training length"

    training_length: int | None = None
    scale: float = 1.0
    backend: str = "auto"

    def validate(self):
        check(self.name, "training_length", self.training_length is None or (
            isinstance(self.training_length, int) and self.training_length >= 2), "None or an integer >= 2",
            self.training_length)
        check(self.name, "scale", isinstance(self.scale, (int, float)) and self.scale > 0, "> 0", self.scale)
        check(self.name, "backend", self.backend in BACKENDS, f"one of {list(BACKENDS)}", self.backend)

    def factors(self, mask, length: int) -> torch.Tensor:
        """[Q] logit multipliers of the call's queries."""
        pos = torch.arange(mask.q_len, dtype=torch.float64) + mask.q_offset
        return torch.clamp(self.scale * torch.log(pos + 1) / math.log(length), min=1.0)

    def attend(self, query, key, value, mask, call: AttendCall):
        length = self.training_length
        if length is None:
            length = getattr(getattr(call.module, "config", None), "max_position_embeddings", None)
            if not length:
                raise ValueError(f"{self.name}: give training_length (the model config has no "
                                 "max_position_embeddings)")
        f = self.factors(mask, length).to(device=query.device, dtype=query.dtype).view(1, 1, -1, 1)
        # Scaling the query scales its logits; positions within the training length keep factor 1 exactly.
        return dense_attention(query * f, key, value, mask, scale=call.scale, softcap=call.softcap,
                               dropout=call.dropout, backend=self.backend)
