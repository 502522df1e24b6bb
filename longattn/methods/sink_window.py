"""Attention sinks plus a sliding window ("A-shape"): the StreamingLLM attention pattern."""
from __future__ import annotations

from dataclasses import dataclass

from .base import check
from .window_family import LocalPattern, WindowMethod


@dataclass
class SinkWindow(WindowMethod):
    """Each query attends to the first `sink_tokens` tokens and the `window` most recent ones (Xiao et al.
    2023, Efficient Streaming Language Models with Attention Sinks, arXiv:2309.17453).

    Sinks are the first real tokens of each sequence (left padding is skipped). This is the attention
    pattern over a full cache; evicting the cache to the same budget is the kvcache "streaming_llm" policy.

    Parameters: sink_tokens (initial tokens every query keeps attending to, >= 0; 4 in the paper), and window,
    density, density_length, backend (see WindowMethod).
    """

    name = "sink_window"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"
    summary = "first `sink_tokens` tokens + the `window` most recent (A-shape)"

    sink_tokens: int = 4

    def validate_fields(self):
        check(self.name, "sink_tokens", isinstance(self.sink_tokens, int) and self.sink_tokens >= 0,
              "an integer >= 0", self.sink_tokens)

    def local_pattern(self, window=None):
        return LocalPattern(self.window if window is None else window, sink_tokens=self.sink_tokens)
