"""A context compressed once, then several questions asked over it (kvpress's pipeline protocol): the policy sees
only the context while it evicts, so what it keeps cannot depend on the question."""
from __future__ import annotations

import copy

import torch

from .cache import CompressedCache


def compress_context(model, context_ids: torch.Tensor) -> CompressedCache:
    """Prefill `context_ids` [1, S] into a compressed cache under the model's KV policy (patch the model with one
    first, e.g. longattn.patch(model, "snapkv", compression_ratio=0.5)); returns the cache, evicted."""
    from ..patching import patch_state

    state = patch_state(model)
    if state is None or state.kv_policy is None:
        raise ValueError("compress_context: patch the model with a KV policy first, e.g. "
                         "longattn.patch(model, 'snapkv', compression_ratio=0.5)")
    if context_ids.dim() != 2 or context_ids.shape[0] != 1:
        raise ValueError(f"compress_context takes one context [1, S], got shape {tuple(context_ids.shape)}")
    cache = CompressedCache(state.kv_policy, model)
    with torch.no_grad():
        model(input_ids=context_ids.to(next(model.parameters()).device), cache=cache, use_cache=True)
    return cache


def ask(model, tokenizer, context: str | torch.Tensor, questions: list[str], max_new_tokens: int = 32,
        **generate_kwargs) -> list[str]:
    """Greedy answers to each question after the context, the context compressed once (each question decodes
    from its own copy of the compressed cache). `context` is text (tokenized with the tokenizer's special tokens)
    or ids [1, S]; each question is appended as text right after it."""
    if isinstance(context, str):
        context_ids = tokenizer(context, return_tensors="pt")["input_ids"]
    else:
        context_ids = context
    if not questions:
        raise ValueError("ask: give at least one question")
    compressed = compress_context(model, context_ids)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for question in questions:
        q_ids = tokenizer(question, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([context_ids, q_ids], dim=1).to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=copy.deepcopy(compressed),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **generate_kwargs)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers
