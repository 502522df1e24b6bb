"""Run one measurement cell (a task or perplexity at one length, under one patched method) into a record."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from ..patching import patch_state, patched
from .memory import PeakMemory
from .perplexity import sliding_window_perplexity
from .tasks import generate_answers, load_filler, make_task, score_answers


@dataclass
class Cell:
    """One point of a sweep. kind "task": `samples` prompts of `task` at `length` tokens; kind "perplexity":
    strided perplexity of `text` (its first `tokens` tokens) with `length`-token windows."""

    kind: str
    method: str
    length: int
    params: dict = field(default_factory=dict)
    layers: object = None
    task: str | None = None
    task_params: dict = field(default_factory=dict)
    samples: int = 10
    seed: int = 0
    filler: str = "grass"
    text: str | None = None
    tokens: int = 16384
    stride: int | None = None

    def key(self) -> str:
        """Stable identity of the cell: what a resumed sweep compares to skip finished work."""
        return json.dumps(asdict(self), sort_keys=True, default=str)


def versions() -> dict:
    import transformers

    import longattn

    return {"longattn": longattn.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers Cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class Resources:
    """Fillers, texts and token ids loaded once per run and shared by the cells that need them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._fillers, self._texts = {}, {}

    def filler(self, spec):
        if spec not in self._fillers:
            self._fillers[spec] = load_filler(spec)
        return self._fillers[spec]

    def text_ids(self, spec: str, n: int) -> torch.Tensor:
        if spec not in self._texts:
            from .texts import load_text

            self._texts[spec] = self.tokenizer(load_text(spec), add_special_tokens=False)["input_ids"]
        ids = self._texts[spec]
        if len(ids) < 2:
            raise ValueError(f"text {spec!r} has fewer than 2 tokens")
        return torch.tensor(ids[:n])


def run_cell(model, tokenizer, cell: Cell, model_name: str, resources: Resources | None = None,
             batch_size: int = 8) -> dict:
    """Measure one cell; returns its JSON-serializable record."""
    resources = resources or Resources(tokenizer)
    device = next(model.parameters()).device
    record = {"cell": cell.key(), **asdict(cell), "model": model_name}
    # Inputs are prepared outside the timed region: only the model's work is measured.
    if cell.kind == "task":
        samples = _task_samples(tokenizer, cell, resources)
    elif cell.kind == "perplexity":
        ids = resources.text_ids(cell.text or "python-doc", cell.tokens)
    else:
        raise ValueError(f"unknown cell kind {cell.kind!r} (task or perplexity)")
    with patched(model, cell.method, layers=cell.layers, **cell.params):
        meter = patch_state(model).meter
        meter.reset()
        with torch.no_grad(), PeakMemory(device) as mem:
            t0 = time.perf_counter()
            if cell.kind == "task":
                record.update(_run_task(model, tokenizer, samples, batch_size))
            else:
                res = sliding_window_perplexity(model, ids, cell.length, cell.stride or cell.length // 2)
                record.update(score=res.perplexity, perplexity=res.perplexity, nll=res.nll,
                              scored_tokens=res.tokens, tokens_processed=res.processed, phase="prefill")
            wall = time.perf_counter() - t0
        record.update(density=meter.density(), density_prefill=meter.density("prefill"),
                      density_decode=meter.density("decode"))
    record.update(wall_s=round(wall, 3), tokens_per_s=round(record.pop("tokens_processed") / wall, 1),
                  peak_mem_bytes=mem.peak_bytes, device=str(device), versions=versions(),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return record


def _task_samples(tokenizer, cell: Cell, resources: Resources):
    task = make_task(cell.task, **cell.task_params)
    filler = resources.filler(cell.filler)
    n = cell.samples
    # Needle depths spread evenly over the context (the first asked needle of multi-needle tasks).
    depths = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    return [task.make(tokenizer, cell.length, seed=cell.seed * 1_000_003 + i, filler=filler, depth=d)
            for i, d in enumerate(depths)]


def _run_task(model, tokenizer, samples, batch_size: int) -> dict:
    stats: dict = {}
    answers = generate_answers(model, tokenizer, samples, batch_size=batch_size, stats=stats)
    per_sample = score_answers(samples, answers)
    metrics = samples[0].metrics
    means = {m: sum(s[m] for s in per_sample) / len(per_sample) for m in metrics}
    return {"score": means[metrics[0]], "metric": metrics[0], "scores": means, "phase": "prefill+decode",
            "kv_cache_bytes": stats["kv_cache_bytes"], "prompt_tokens": stats["prompt_tokens"],
            "generated_tokens": stats["new_tokens"], "tokens_processed": stats["prompt_tokens"] + stats["new_tokens"],
            "predictions": answers[:3]}
