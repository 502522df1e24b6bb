"""LongBench-style question answering from JSONL (Bai et al. 2023, LongBench, arXiv:2308.14508).

Each line: {"context": str, "input": str, "answers": [str, ...]} (other fields are kept as metadata).
Prompts longer than the target length are truncated in the middle, as LongBench does, keeping the start and
the end of the context-plus-question.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..jsonl import iter_jsonl
from .base import PromptFormat, Task, TaskSample, ids_of

TEMPLATE, ANSWER = "{context}\n\nAnswer the question based on the text above.\n\nQuestion: {input}", "\nAnswer:"


def load_longbench_jsonl(path) -> list[dict]:
    """Read and validate a LongBench-style JSONL file; errors name the file and line."""
    records = []
    for lineno, rec in iter_jsonl(path):
        for key in ("context", "input", "answers"):
            if key not in rec:
                raise ValueError(f"{path}:{lineno}: missing field {key!r} (need context, input, answers)")
        if not (isinstance(rec["answers"], list) and rec["answers"] and all(isinstance(a, str)
                                                                             for a in rec["answers"])):
            raise ValueError(f"{path}:{lineno}: 'answers' must be a non-empty list of strings")
        if not isinstance(rec["context"], str) or not isinstance(rec["input"], str):
            raise ValueError(f"{path}:{lineno}: 'context' and 'input' must be strings")
        records.append(rec)
    if not records:
        raise ValueError(f"{Path(path)}: no records")
    return records


@dataclass
class LongBench(Task):
    """Questions from a LongBench-style JSONL file; sample `seed` is record `seed % len(records)`."""

    name = "longbench"
    paper = "Bai et al. 2023, LongBench (arXiv:2308.14508)"
    metrics = ("f1", "exact_match")
    path: str = ""
    max_new_tokens: int = 32
    _records: list = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.records()  # a missing or malformed file is an error now, before any model loads

    def records(self) -> list[dict]:
        if self._records is None:
            if not self.path:
                raise ValueError("longbench: give the JSONL file as path=...")
            self._records = load_longbench_jsonl(self.path)
        return self._records

    def make(self, tokenizer, length, seed, filler=None, depth=None, prompt=PromptFormat()) -> TaskSample:
        recs = self.records()
        rec = recs[seed % len(recs)]
        head, tail = prompt.frame(tokenizer, "", "", ANSWER)
        body = ids_of(tokenizer, TEMPLATE.format(context=rec["context"], input=rec["input"]))
        room = length - len(head) - len(tail)
        if room < 2:
            raise ValueError(f"longbench: length {length} leaves no room for the context")
        if len(body) > room:
            half = room // 2
            body = body[:half] + body[len(body) - (room - half):]
        ids = head + body + tail
        return TaskSample(self.name, ids, list(rec["answers"]), self.metrics, self.max_new_tokens,
                          {"record": seed % len(recs)})
