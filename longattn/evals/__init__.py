"""Measuring harnesses: perplexity and long-context tasks."""
from .passkey import PasskeySample, make_passkey_sample, score_passkey
from .perplexity import PerplexityResult, sliding_window_perplexity

__all__ = ["PasskeySample", "PerplexityResult", "make_passkey_sample", "score_passkey",
           "sliding_window_perplexity"]
