"""Pass-key retrieval (Mohtashami & Jaggi 2023, Landmark Attention, arXiv:2305.16300).

A random number is hidden at a chosen depth inside filler text; the prompt ends by asking for it. Prompts are
assembled from separately tokenized pieces, so their length is exactly the requested number of tokens and
the needle sits exactly at the stated depth.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.")
GRASS = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    input_ids: list[int]
    answer: str
    depth: float  # fraction of the filler placed before the needle
    needle_start: int  # token index where the needle begins
    needle_len: int


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_passkey_sample(tokenizer, length: int, depth: float, seed: int, filler_text: str | None = None,
                        digits: int = 5) -> PasskeySample:
    """A prompt of exactly `length` tokens with the needle after `depth` of the filler.

    `filler_text` None uses the classic repeated "The grass is green..." filler; otherwise a window of that
    text starting at a seeded offset (the text must be at least `length` tokens long).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    head, needle, question = _ids(tokenizer, PREAMBLE), _ids(tokenizer, NEEDLE.format(key=key)), _ids(
        tokenizer, QUESTION)
    n_filler = length - len(head) - len(needle) - len(question)
    if n_filler < 1:
        raise ValueError(f"length {length} is too short for a pass-key prompt (needs > "
                         f"{len(head) + len(needle) + len(question)} tokens)")
    if filler_text is None:
        unit = _ids(tokenizer, GRASS)
        filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    else:
        text_ids = _ids(tokenizer, filler_text)
        if len(text_ids) < n_filler:
            raise ValueError(f"filler text has {len(text_ids)} tokens, fewer than the {n_filler} needed")
        start = rng.randint(0, len(text_ids) - n_filler)
        filler = text_ids[start:start + n_filler]
    cut = round(depth * n_filler)
    ids = head + filler[:cut] + needle + filler[cut:] + question
    return PasskeySample(ids, key, depth, len(head) + cut, len(needle))


@torch.no_grad()
def score_passkey(model, tokenizer, samples: list[PasskeySample], batch_size: int = 8,
                  max_new_tokens: int = 8) -> list[bool]:
    """Greedy-decode an answer for each prompt; correct when its first number equals the key."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        width = max(len(s.input_ids) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(s.input_ids):] = torch.tensor(s.input_ids)
            mask[row, width - len(s.input_ids):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row, s in enumerate(batch):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            found = re.search(r"\d+", text)
            results.append(found is not None and found.group(0) == s.answer)
    return results
