"""Needle-in-a-haystack family of RULER (Hsieh et al. 2024, arXiv:2404.06654): single, multi-key,
multi-value and multi-query variants over "special magic number" needles."""
from __future__ import annotations

from dataclasses import dataclass

from .base import KEY_WORDS, Filler, PromptFormat, Task, TaskSample, build_haystack, ids_of, seeded

NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUERY_ONE = " What is the special magic number for {key}?", " The special magic number for {key} is:"
QUERY_ALL = " What are all the special magic numbers for {key}?", " The special magic numbers for {key} are:"
QUERY_MANY = " What are the special magic numbers for {keys}?", " The special magic numbers for {keys} are:"
HEAD = "Some special magic numbers are hidden within the following text. Make sure to memorize them."


@dataclass
class NeedleInAHaystack(Task):
    """RULER NIAH. variant: "single" (one needle), "multikey" (`needles` needles with different keys, one
    asked), "multivalue" (`needles` values under one key, all asked), "multiquery" (`queries` of the
    `needles` keys asked at once)."""

    name = "niah"
    paper = "Hsieh et al. 2024, RULER (arXiv:2404.06654)"
    metrics = ("string_match_all",)
    variant: str = "single"
    needles: int = 4
    queries: int = 2
    digits: int = 7

    def __post_init__(self):
        variants = ("single", "multikey", "multivalue", "multiquery")
        if self.variant not in variants:
            raise ValueError(f"niah: variant must be one of {list(variants)}, got {self.variant!r}")
        if self.needles < 1 or not 1 <= self.queries <= self.needles:
            raise ValueError(f"niah: need needles >= 1 and 1 <= queries <= needles, got {self.needles}, "
                             f"{self.queries}")

    @property
    def task_name(self) -> str:
        return "niah_" + self.variant

    def make(self, tokenizer, length, seed, filler=None, depth=None, prompt=PromptFormat()) -> TaskSample:
        rng = seeded(self.task_name, seed, length)
        n = 1 if self.variant == "single" else self.needles
        keys = rng.sample(KEY_WORDS, n)
        if self.variant == "multivalue":
            keys = [keys[0]] * n
        values = [str(rng.randint(10 ** (self.digits - 1), 10 ** self.digits - 1)) for _ in range(n)]
        depths = [rng.random() for _ in range(n)]
        if depth is not None:
            depths[0] = depth  # the (first) asked needle sits at the requested depth
        if self.variant in ("single", "multikey"):
            query, answers = [q.format(key=keys[0]) for q in QUERY_ONE], [values[0]]
        elif self.variant == "multivalue":
            query, answers = [q.format(key=keys[0]) for q in QUERY_ALL], values
        else:
            asked = list(range(self.queries))
            query = [q.format(keys=", ".join(keys[i] for i in asked)) for q in QUERY_MANY]
            answers = [values[i] for i in asked]
        inserts = [ids_of(tokenizer, NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
        head, tail = prompt.frame(tokenizer, HEAD, *query)
        ids, starts, n_filler = build_haystack(tokenizer, length, head, inserts, depths, tail, filler or Filler(),
                                               rng)
        return TaskSample(self.task_name, ids, answers, self.metrics, (self.digits + 3) * len(answers),
                          {"depths": depths, "needle_spans": [(s, len(i)) for s, i in zip(starts, inserts)],
                           "keys": keys, "head_tokens": len(head), "filler_tokens": n_filler})
