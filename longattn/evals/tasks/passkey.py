"""Pass-key retrieval (Mohtashami & Jaggi 2023, Landmark Attention, arXiv:2305.16300).

A random number hides at a chosen depth inside filler text; the prompt ends by asking for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Filler, PromptFormat, Task, TaskSample, build_haystack, ids_of, seeded

PREAMBLE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION, ANSWER = " What is the pass key?", " The pass key is"


@dataclass
class Passkey(Task):
    """Pass-key retrieval: one `digits`-digit number, asked for at the end."""

    name = "passkey"
    paper = "Mohtashami & Jaggi 2023, Landmark Attention (arXiv:2305.16300)"
    metrics = ("first_number_match",)
    digits: int = 5

    def make(self, tokenizer, length, seed, filler=None, depth=None, prompt=PromptFormat()) -> TaskSample:
        rng = seeded(self.name, seed, length)
        depth = rng.random() if depth is None else depth
        key = str(rng.randint(10 ** (self.digits - 1), 10 ** self.digits - 1))
        needle = ids_of(tokenizer, NEEDLE.format(key=key))
        head, tail = prompt.frame(tokenizer, PREAMBLE, QUESTION, ANSWER)
        ids, (start,), n_filler = build_haystack(tokenizer, length, head, [needle], [depth], tail,
                                                 filler or Filler(), rng)
        return TaskSample(self.name, ids, [key], self.metrics, self.digits + 3,
                          {"depths": [depth], "needle_spans": [(start, len(needle))], "head_tokens": len(head),
                           "filler_tokens": n_filler})


def make_passkey_sample(tokenizer, length: int, depth: float, seed: int, filler_text: str | None = None,
                        digits: int = 5, chat: bool = False) -> TaskSample:
    """Convenience wrapper: a pass-key prompt of exactly `length` tokens with the needle at `depth`."""
    return Passkey(digits=digits).make(tokenizer, length, seed, Filler(filler_text), depth, PromptFormat(chat))
