"""Measuring harnesses: perplexity, long-context tasks, sweeps and reports."""
from .perplexity import PerplexityResult, sliding_window_perplexity
from .tasks import TASKS, generate_answers, make_passkey_sample, make_task, score_answers

__all__ = ["PerplexityResult", "TASKS", "generate_answers", "make_passkey_sample", "make_task", "score_answers",
           "sliding_window_perplexity"]
