"""Log-length attention scaling: sharpen attention beyond the training length, training-free."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import check
from .temperature import PositionTemperature


@dataclass
class LogNScaling(PositionTemperature):
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

    scale: float = 1.0

    def validate(self):
        super().validate()
        check(self.name, "scale", isinstance(self.scale, (int, float)) and self.scale > 0, "> 0", self.scale)

    def factors(self, positions, training_length):
        return torch.clamp(self.scale * torch.log(positions + 1) / math.log(training_length), min=1.0)
