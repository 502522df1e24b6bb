"""Key-value retrieval (Liu et al. 2023, Lost in the Middle, arXiv:2307.03172): a JSON object of random
UUID pairs; return the value of one key. The asked pair sits at the requested depth of the object."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .base import PromptFormat, Task, TaskSample, ids_of, pad_with_spaces, seeded

HEAD = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
QUESTION, ANSWER = '}}\n\nKey: "{key}"', '\nThe value associated with the specified key is: "'


@dataclass
class KVRetrieval(Task):
    """Pairs are added while they fit; JSON whitespace makes up the last few tokens."""

    name = "kv_retrieval"
    paper = "Liu et al. 2023, Lost in the Middle (arXiv:2307.03172)"
    metrics = ("string_match_all",)

    def make(self, tokenizer, length, seed, filler=None, depth=None, prompt=PromptFormat()) -> TaskSample:
        rng = seeded(self.name, seed, length)
        new_id = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))  # noqa: E731
        key, value = new_id(), new_id()
        head, tail = prompt.frame(tokenizer, HEAD, QUESTION.format(key=key), ANSWER)
        fixed = len(head) + len(tail)
        pair_cost = len(ids_of(tokenizer, json.dumps({key: value})[1:-1] + ", "))
        n_pairs = max(1, (length - fixed) // pair_cost)
        pairs = [(new_id(), new_id()) for _ in range(n_pairs - 1)]
        pos = round((rng.random() if depth is None else depth) * (n_pairs - 1))
        pairs.insert(pos, (key, value))
        body = ", ".join(json.dumps(k) + ": " + json.dumps(v) for k, v in pairs)
        ids = head + ids_of(tokenizer, body) + tail
        while len(ids) > length and len(pairs) > 1:  # the estimate was slightly high: drop a distractor
            pairs.pop(-1 if pairs[-1][0] != key else 0)
            body = ", ".join(json.dumps(k) + ": " + json.dumps(v) for k, v in pairs)
            ids = head + ids_of(tokenizer, body) + tail
        ids = pad_with_spaces(tokenizer, ids, length, len(ids) - len(tail))
        return TaskSample(self.name, ids, [value], self.metrics, len(ids_of(tokenizer, value)) + 4,
                          {"pairs": len(pairs), "depth_index": pos,
                           "depths": [pairs.index((key, value)) / max(1, len(pairs) - 1)]})
