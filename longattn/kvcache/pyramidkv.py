"""PyramidKV: SnapKV's selection with budgets that shrink from the lowest layer to the highest."""
from __future__ import annotations

from dataclasses import dataclass

from ..methods.base import check
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """Pyramidal layer budgets (Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling, arXiv:2406.02069): with an average budget k and observation window w, the top layer
    keeps (k - w) / beta + w, the bottom layer 2 (k - w) - (k - w) / beta + w, the layers between on a straight
    line, so the average over layers stays k. Entries are chosen per head by SnapKV's pooled votes.

    Parameters
    ----------
    beta : float
        Ratio between the average and the top layer's share of the non-window budget (> 1).
    window, kernel_size, pooling, kv_budget, compression_ratio
        See SnapKV.
    """

    name = "pyramidkv"
    paper = "Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (arXiv:2406.02069)"
    summary = "SnapKV votes with layer budgets decreasing bottom to top"

    beta: float = 20.0

    def validate(self):
        super().validate()
        check(self.name, "beta", isinstance(self.beta, (int, float)) and self.beta > 1, "> 1", self.beta)

    def layer_share(self, keep: int, layer_idx: int, n_layers: int) -> int:
        window = min(self.window, keep)
        spare = keep - window
        if n_layers == 1 or spare <= 0:
            return keep
        low = spare / self.beta
        high = 2 * spare - low
        return window + round(high - layer_idx * (high - low) / (n_layers - 1))
