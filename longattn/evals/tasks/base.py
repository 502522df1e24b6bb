"""Shared pieces of the long-context task generators: samples, fillers and exact-length haystacks."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

GRASS = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Common, short English words used as needle keys (fixed so that seeds reproduce across machines).
KEY_WORDS = (
    "apple river stone garden window candle forest silver market bridge planet castle harbor meadow pencil "
    "rocket summer winter valley island mirror basket thunder ocean lantern feather orange button violin "
    "carpet dragon engine falcon ginger helmet jacket kitten ladder magnet needle oyster parrot quartz rabbit "
    "saddle tunnel umbrella velvet walnut yellow zebra anchor barrel cactus dolphin emerald fabric glacier "
    "hammer igloo jungle kettle lemon mango nickel olive pepper quiver ribbon shovel tomato unicorn vessel "
    "wizard canyon copper desert pillow marble spider tiger wallet cherry"
).split()


@dataclass
class TaskSample:
    """One prompt (token ids) and what a correct answer contains."""

    task: str
    input_ids: list[int]
    answers: list[str]
    metrics: tuple[str, ...]  # the first is the task's score; all are recorded
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_with_spaces(tokenizer, ids: list[int], length: int, at: int) -> list[int]:
    """Insert single-space tokens at index `at` until `ids` is exactly `length` long (whitespace that the
    prompt's format allows, e.g. between JSON items), so every generator hits its length exactly."""
    space = ids_of(tokenizer, " ")
    if len(ids) >= length or len(space) != 1:
        return ids
    return ids[:at] + space * (length - len(ids)) + ids[at:]


class Filler:
    """Distractor text: the classic repeated "The grass is green..." lines, or windows of a given text."""

    def __init__(self, text: str | None = None, name: str | None = None):
        self.text, self.name = text, name or ("grass" if text is None else "text")
        self._encoded: dict[int, list[int]] = {}

    def tokens(self, tokenizer, n: int, rng: random.Random) -> list[int]:
        if n <= 0:
            return []
        key = id(tokenizer)
        if key not in self._encoded:
            self._encoded[key] = ids_of(tokenizer, GRASS if self.text is None else self.text)
        src = self._encoded[key]
        if self.text is None:
            return (src * (n // len(src) + 1))[:n]
        if len(src) < n:
            raise ValueError(f"filler text {self.name!r} has {len(src)} tokens, fewer than the {n} needed")
        start = rng.randint(0, len(src) - n)
        return src[start:start + n]


def load_filler(spec: str | None, cache=None) -> Filler:
    """"grass" (or None), "python-doc" (Python documentation prose), or a path to a UTF-8 text file."""
    if spec in (None, "grass"):
        return Filler()
    if spec == "python-doc":
        from ..corpora import DEFAULT_CACHE, python_doc_prose

        return Filler(python_doc_prose(cache or DEFAULT_CACHE), "python-doc")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"filler {spec!r}: expected 'grass', 'python-doc' or a readable text file")
    return Filler(path.read_text(encoding="utf-8", errors="replace"), path.name)


def build_haystack(tokenizer, length: int, head: list[int], inserts: list[list[int]], depths: list[float],
                   tail: list[int], filler: Filler, rng: random.Random) -> tuple[list[int], list[int], int]:
    """head + filler with `inserts` at `depths` (fractions of the filler) + tail, exactly `length` tokens.

    Returns the ids, the start index of each insert (in the order given) and the number of filler tokens.
    """
    if len(inserts) != len(depths) or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"need one depth in [0, 1] per insert, got {depths}")
    n_filler = length - len(head) - sum(map(len, inserts)) - len(tail)
    if n_filler < 1:
        raise ValueError(f"length {length} is too short: the prompt's fixed parts already take "
                         f"{length - n_filler} tokens")
    filler_ids = filler.tokens(tokenizer, n_filler, rng)
    order = sorted(range(len(inserts)), key=lambda i: (depths[i], i))
    ids, starts, cursor = list(head), [0] * len(inserts), 0
    for i in order:
        cut = round(depths[i] * n_filler)
        ids += filler_ids[cursor:cut]
        cursor = max(cursor, cut)
        starts[i] = len(ids)
        ids += inserts[i]
    ids += filler_ids[cursor:] + tail
    return ids, starts, n_filler


def seeded(task: str, seed: int, length: int) -> random.Random:
    """A generator seeded from (task, seed, length): samples are stable across runs and machines."""
    digest = hashlib.sha256(f"{task}|{seed}|{length}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class PromptFormat:
    """How a task prompt is framed for a model: raw text led by the tokenizer's BOS where it adds one, or (chat)
    the task as the user's message of the tokenizer's chat template, the answer's lead-in opening the reply."""

    chat: bool = False

    def frame(self, tokenizer, head: str, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(ids before the task's context, ids after it) around a context of head + ... + question, ending with
        the answer's lead-in (e.g. " The pass key is") where generation starts."""
        if not self.chat:
            return bos_ids(tokenizer) + ids_of(tokenizer, head), ids_of(tokenizer, question + answer)
        before, after = chat_turn(tokenizer)
        return before + ids_of(tokenizer, head), (ids_of(tokenizer, question) + after
                                                  + ids_of(tokenizer, answer.lstrip()))


def bos_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by itself (Gemma, Llama: BOS; GPT-2 style: none)."""
    plain = ids_of(tokenizer, "a")
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def chat_turn(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after one user message (through the assistant's turn start)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat prompts need a tokenizer with a chat template; {type(tokenizer).__name__} "
                         f"({getattr(tokenizer, 'name_or_path', '')}) has none (run without --chat / chat=false)")
    mark = "<<LONGATTN-USER-MESSAGE>>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(mark) != 1:
        raise ValueError("the tokenizer's chat template does not place the user message verbatim")
    before, after = text.split(mark)
    return ids_of(tokenizer, before), ids_of(tokenizer, after)


@dataclass
class Task:
    """Base of a seeded long-context task generator."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ("string_match_all",)

    def make(self, tokenizer, length: int, seed: int, filler: Filler | None = None,
             depth: float | None = None, prompt: PromptFormat = PromptFormat()) -> TaskSample:
        raise NotImplementedError
