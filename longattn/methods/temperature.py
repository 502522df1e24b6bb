"""Base of the training-free temperature methods: dense attention whose logits are multiplied by a factor
that depends only on the query's position (so decoding token by token equals a prefill pass)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.dense import BACKENDS, dense_attention
from .base import AttendCall, AttentionMethod, check


@dataclass
class PositionTemperature(AttentionMethod):
    """Subclasses define `factors(positions, training_length)`; not a method by itself."""

    training_length: int | None = None
    backend: str = "auto"

    def validate(self):
        check(self.name, "training_length", self.training_length is None or (
            isinstance(self.training_length, int) and self.training_length >= 2), "None or an integer >= 2",
            self.training_length)
        check(self.name, "backend", self.backend in BACKENDS, f"one of {list(BACKENDS)}", self.backend)

    def factors(self, positions: torch.Tensor, training_length: int) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, query, key, value, mask, call: AttendCall):
        length = self.training_length
        if length is None:
            length = getattr(getattr(call.module, "config", None), "max_position_embeddings", None)
            if not length:
                raise ValueError(f"{self.name}: give training_length (the model config has no "
                                 "max_position_embeddings)")
        positions = (torch.arange(mask.q_len, dtype=torch.float64) + mask.q_offset).view(1, -1)
        first = mask.first_real_token()
        if first is not None:  # a query's position counts its row's real tokens (left padding skipped)
            positions = (positions - first.cpu().view(-1, 1)).clamp_min(0)
        f = self.factors(positions, length).to(device=query.device, dtype=query.dtype).unsqueeze(1).unsqueeze(-1)
        # Scaling the query scales its logits exactly; a factor of 1 leaves the query untouched.
        return dense_attention(query * f, key, value, mask, scale=call.scale, softcap=call.softcap,
                               dropout=call.dropout, backend=self.backend)
