"""Common-words extraction of RULER (Hsieh et al. 2024, arXiv:2404.06654): in a long numbered list of
words, name the `top` words that occur most often."""
from __future__ import annotations

from dataclasses import dataclass

from .base import KEY_WORDS, PromptFormat, Task, TaskSample, ids_of, pad_with_spaces, seeded

HEAD = "Below is a numbered list of words. In these words, some appear more often than others."
QUESTION = " Question: What are the {top} most common words in the above list?"
ANSWER = " Answer: The top {top} words that appear most often in the list are:"


@dataclass
class CommonWords(Task):
    """`top` common words appear `common_freq` times each; rare words fill the rest, `rare_freq` times each.

    The list grows entry by entry while it fits; spaces before the question make up the last few tokens."""

    name = "common_words"
    paper = "Hsieh et al. 2024, RULER (arXiv:2404.06654)"
    metrics = ("string_match_all",)
    top: int = 10
    common_freq: int | None = None  # None: up to 30, so that common words fill at most a third of the list
    rare_freq: int = 3

    def make(self, tokenizer, length, seed, filler=None, depth=None, prompt=PromptFormat()) -> TaskSample:
        rng = seeded(self.name, seed, length)
        vocab = list(KEY_WORDS)
        rng.shuffle(vocab)
        common, rare_pool = vocab[:self.top], vocab[self.top:]
        head, tail = prompt.frame(tokenizer, HEAD, QUESTION.format(top=self.top), ANSWER.format(top=self.top))
        budget = length - len(head) - len(tail)
        freq = self.common_freq
        if freq is None:
            per_entry = len(ids_of(tokenizer, f" {budget // 5}. {common[0]}"))
            freq = max(self.rare_freq + 2, min(30, budget // (3 * self.top * per_entry)))
        words = [w for w in common for _ in range(freq)]
        cost = sum(len(ids_of(tokenizer, f" {i + 1}. {w}")) for i, w in enumerate(words))
        groups = []  # rare words added, each a group of rare_freq entries
        while True:  # add rare words while the (estimated) list still fits; the pool cycles with suffixes
            i = len(groups)
            base = rare_pool[i % len(rare_pool)]
            word = base if i < len(rare_pool) else f"{base}{i // len(rare_pool)}"
            extra = sum(len(ids_of(tokenizer, f" {len(words) + j + 1}. {word}")) for j in range(self.rare_freq))
            if cost + extra > budget:
                break
            words += [word] * self.rare_freq
            cost += extra
            groups.append(word)
        while True:  # the exact count after shuffling may differ by a token or two: drop rare groups if needed
            shuffled = list(words)
            rng.shuffle(shuffled)
            body = ids_of(tokenizer, self._render(shuffled))
            if len(body) <= budget or not groups:
                break
            words = [w for w in words if w != groups.pop()]
        if len(body) > budget:
            raise ValueError(f"length {length} is too short for {self.top} words x {freq} repeats")
        ids = pad_with_spaces(tokenizer, head + body + tail, length, len(head) + len(body))
        return TaskSample(self.name, ids, list(common), self.metrics, 4 * self.top,
                          {"list_len": len(words), "common_freq": freq})

    @staticmethod
    def _render(words: list[str]) -> str:
        return "".join(f" {i + 1}. {w}" for i, w in enumerate(words))
