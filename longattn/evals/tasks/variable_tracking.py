"""Variable tracking of RULER (Hsieh et al. 2024, arXiv:2404.06654): follow chains of assignments
"VAR B = VAR A" scattered through the context and name every variable holding a value."""
from __future__ import annotations

import string
from dataclasses import dataclass

from .base import Filler, PromptFormat, Task, TaskSample, build_haystack, ids_of, seeded

QUESTION = " Question: Find all variables that are assigned the value {value} in the text above."
ANSWER = (" Answer: According to the chain of variable assignments in the text above, {n} variables are assigned "
          "the value {value}, they are:")
HEAD = "Memorize and track the chain of variable assignments hidden in the following text."


@dataclass
class VariableTracking(Task):
    """`chains` chains of `hops` + 1 variables each; the question asks for the variables of the first chain."""

    name = "variable_tracking"
    paper = "Hsieh et al. 2024, RULER (arXiv:2404.06654)"
    metrics = ("string_match_all",)
    chains: int = 1
    hops: int = 4

    def make(self, tokenizer, length, seed, filler=None, depth=None, prompt=PromptFormat()) -> TaskSample:
        rng = seeded(self.name, seed, length)
        names: set[str] = set()
        while len(names) < self.chains * (self.hops + 1):
            names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
        names_list = sorted(names)
        rng.shuffle(names_list)
        inserts, depths, first_chain, values = [], [], [], set()
        for c in range(self.chains):
            chain = names_list[c * (self.hops + 1):(c + 1) * (self.hops + 1)]
            value = str(rng.randint(10000, 99999))
            while value in values:
                value = str(rng.randint(10000, 99999))
            values.add(value)
            # Assignments appear in chain order: depth grows along the chain.
            chain_depths = sorted(rng.random() for _ in chain)
            if c == 0 and depth is not None:  # the asked chain starts at the requested depth
                chain_depths = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in chain[1:])
            for i, var in enumerate(chain):
                rhs = value if i == 0 else f"VAR {chain[i - 1]}"
                inserts.append(ids_of(tokenizer, f" VAR {var} = {rhs}."))
                depths.append(chain_depths[i])
            if c == 0:
                first_chain, asked_value = chain, value
        head, tail = prompt.frame(tokenizer, HEAD, QUESTION.format(value=asked_value),
                                  ANSWER.format(value=asked_value, n=len(first_chain)))
        ids, starts, n_filler = build_haystack(tokenizer, length, head, inserts, depths, tail, filler or Filler(),
                                               rng)
        return TaskSample(self.name, ids, list(first_chain), self.metrics, 8 * len(first_chain),
                          {"depths": depths, "needle_spans": [(s, len(i)) for s, i in zip(starts, inserts)],
                           "head_tokens": len(head), "filler_tokens": n_filler})
