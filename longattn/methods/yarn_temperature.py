"""YaRN's attention temperature, on its own (no RoPE interpolation), training-free."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import check
from .temperature import PositionTemperature


@dataclass
class YarnTemperature(PositionTemperature):
    """Multiply attention logits by (0.1 ln s + 1)^2, YaRN's temperature for a context s times the training
    length (Peng et al. 2023, YaRN, arXiv:2309.00071: sqrt(1/t) = 0.1 ln s + 1). With `factor` None the
    scale is dynamic, s = max(1, (p + 1) / L) for a query at position p, so nothing changes within the
    training length L. Only the temperature half of YaRN: positions are not interpolated.

    Parameters
    ----------
    factor : float or None
        Fixed context extension s (>= 1), or None for the dynamic per-position scale.
    training_length : int or None
        L; None takes the model config's max_position_embeddings.
    backend : str
        Dense kernel ("auto", "sdpa", "flex", "flash", "math").
    """

    name = "yarn_temperature"
    paper = "Peng et al. 2023, YaRN: Efficient Context Window Extension of LLMs (arXiv:2309.00071)"
    summary = "YaRN attention temperature (0.1 ln s + 1)^2, fixed or per-position s"

    factor: float | None = None

    def validate(self):
        super().validate()
        check(self.name, "factor", self.factor is None or (isinstance(self.factor, (int, float))
                                                           and self.factor >= 1), "None or >= 1", self.factor)

    def factors(self, positions, training_length):
        s = torch.full_like(positions, float(self.factor)) if self.factor is not None else torch.clamp(
            (positions + 1) / training_length, min=1.0)
        return (0.1 * torch.log(s) + 1) ** 2
