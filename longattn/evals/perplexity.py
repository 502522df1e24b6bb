"""Sliding-window perplexity: each token is scored once, with up to `context` tokens before it.

The standard strided method (as in the Hugging Face perplexity guide): windows of `context` tokens advance by
`stride`; each window scores only the tokens not scored by the previous one, so that with stride < context
every scored token (after the first window) has at least context - stride tokens of history.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # number of scored tokens
    context: int
    stride: int
    processed: int = 0  # tokens run through the model (windows overlap when stride < context)


@torch.no_grad()
def sliding_window_perplexity(model, input_ids: torch.Tensor, context: int, stride: int | None = None,
                              progress: bool = False, bos: list[int] | tuple = ()) -> PerplexityResult:
    """Perplexity of a 1-D token sequence under `model` with windows of `context` tokens every `stride`.

    `bos`: tokens that lead every window (the model's BOS, for models such as Gemma that expect one), counted in
    the window's `context` tokens and never scored; a window's first text token is then scored too.
    """
    stride = context if stride is None else stride
    lead = torch.tensor(list(bos), dtype=torch.long)
    if context - len(lead) < 2 or not 1 <= stride <= context - len(lead):
        raise ValueError(f"need context >= 2 and 1 <= stride <= context - BOS tokens ({len(lead)}), got "
                         f"context={context}, stride={stride}")
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    total_nll, total_tokens, prev_end, processed = 0.0, 0, 0, 0
    starts = range(0, ids.numel() - 1, stride)
    for begin in tqdm(starts, desc=f"ppl@{context}", disable=not progress):
        end = min(begin + context - len(lead), ids.numel())
        window = torch.cat([lead, ids[begin:end]]).unsqueeze(0).to(device)
        processed += window.shape[1]
        # Targets not scored before; without a BOS the window's first token has no context and is not scored.
        n_new = end - max(prev_end, begin + (0 if len(lead) else 1))
        logits = model(input_ids=window).logits[0, -n_new - 1:-1].float()
        nll = F.cross_entropy(logits, window[0, -n_new:], reduction="sum")
        total_nll += nll.item()
        total_tokens += n_new
        prev_end = end
        if end == ids.numel():
            break
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, context, stride, processed)
