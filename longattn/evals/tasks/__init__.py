"""Seeded long-context task generators with tokenizer-aware length control, and their scoring."""
from __future__ import annotations

from functools import partial

import torch

from ..metrics import METRICS
from .base import Filler, Task, TaskSample, build_haystack, load_filler
from .common_words import CommonWords
from .kv_retrieval import KVRetrieval
from .longbench import LongBench, load_longbench_jsonl
from .niah import NeedleInAHaystack
from .passkey import Passkey, make_passkey_sample
from .variable_tracking import VariableTracking

TASKS = {
    "passkey": Passkey,
    "niah_single": partial(NeedleInAHaystack, variant="single"),
    "niah_multikey": partial(NeedleInAHaystack, variant="multikey"),
    "niah_multivalue": partial(NeedleInAHaystack, variant="multivalue"),
    "niah_multiquery": partial(NeedleInAHaystack, variant="multiquery"),
    "variable_tracking": VariableTracking,
    "common_words": CommonWords,
    "kv_retrieval": KVRetrieval,
    "longbench": LongBench,
}


def make_task(name: str, **params) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    try:
        return TASKS[name](**params)
    except TypeError as e:
        raise ValueError(f"task {name}: bad parameters {params} ({e})") from None


@torch.no_grad()
def generate_answers(model, tokenizer, samples: list[TaskSample], batch_size: int = 8,
                     stats: dict | None = None) -> list[str]:
    """Greedy answers, batched with left padding so every prompt ends where generation starts.

    `stats`, if given, receives prompt_tokens, new_tokens and kv_cache_bytes (mean per sample at the end of
    generation, read from the cache object generate() returns).
    """
    from ..runner import cache_bytes

    stats = {} if stats is None else stats
    stats.update(prompt_tokens=0, new_tokens=0)
    kv_total = 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        width = max(len(s.input_ids) for s in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(batch):
            ids[row, width - len(s.input_ids):] = torch.tensor(s.input_ids)
            mask[row, width - len(s.input_ids):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max(s.max_new_tokens for s in batch), pad_token_id=pad,
                             return_dict_in_generate=True)
        out = gen.sequences
        answers += [tokenizer.decode(out[row, width:width + s.max_new_tokens], skip_special_tokens=True)
                    for row, s in enumerate(batch)]
        kv_total += cache_bytes(gen.cache)
        stats["prompt_tokens"] += sum(len(s.input_ids) for s in batch)
        stats["new_tokens"] += (out.shape[1] - width) * len(batch)
    stats["kv_cache_bytes"] = kv_total // max(1, len(samples))
    return answers


def score_answers(samples: list[TaskSample], predictions: list[str]) -> list[dict[str, float]]:
    """Every metric of each sample's task, per sample."""
    return [{m: METRICS[m](p, s.answers) for m in s.metrics} for s, p in zip(samples, predictions)]


__all__ = ["CommonWords", "Filler", "KVRetrieval", "LongBench", "NeedleInAHaystack", "Passkey", "TASKS", "Task",
           "TaskSample", "VariableTracking", "build_haystack", "generate_answers", "load_filler",
           "load_longbench_jsonl", "make_passkey_sample", "make_task", "score_answers"]
