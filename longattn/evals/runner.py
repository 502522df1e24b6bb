"""Run one measurement cell (a task or perplexity at one length, under one patched method) into a record."""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from ..patching import patch_state, patched
from .memory import PeakMemory
from .perplexity import sliding_window_perplexity
from .metrics import mean_ci95
from .tasks import generate_answers, load_filler, make_task, score_answers
from .tasks.base import PromptFormat, bos_ids


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
    chat: bool = False  # task prompts in the tokenizer's chat template

    def key(self) -> str:
        """Stable identity of the cell: what a resumed sweep compares to skip finished work. Fields added after
        results were committed are left out while they hold their default, so older records keep their keys."""
        d = asdict(self)
        for name, default in LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return json.dumps(d, sort_keys=True, default=str)


LATER_FIELDS = {"chat": False}


def versions() -> dict:
    import transformers

    import longattn

    return {"longattn": longattn.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers Cache (a compressed layer counts every tensor it
    holds, whatever its layout: head_hybrid keeps two groups of heads)."""
    from ..kvcache import CompressedLayer

    total = 0
    for layer in getattr(cache, "layers", []):
        tensors = layer.tensors() if isinstance(layer, CompressedLayer) and layer.is_initialized else \
            [getattr(layer, "keys", None), getattr(layer, "values", None)]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
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
             batch_size: int = 8, done_samples: dict | None = None, on_samples=None, progress: bool = False) -> dict:
    """Measure one cell; returns its JSON-serializable record.

    Task cells run their prompts in batches; after each batch `on_samples(records)` receives one record per
    prompt (so a caller can append them durably), and prompts in `done_samples` ({index: sample record}, from an
    interrupted run) are not run again: the cell record aggregates old and new samples.
    """
    resources = resources or Resources(tokenizer)
    device = next(model.parameters()).device
    record = {"record": "cell", "cell": cell.key(), **asdict(cell), "model": model_name}
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
                record.update(_run_task(model, tokenizer, cell, model_name, samples, batch_size, meter,
                                        done_samples or {}, on_samples, progress))
                wall = record.pop("new_wall_s")
            else:
                res = sliding_window_perplexity(model, ids, cell.length, cell.stride or cell.length // 2,
                                                progress=progress, bos=bos_ids(tokenizer))
                record.update(score=res.perplexity, perplexity=res.perplexity, nll=res.nll, n=1,
                              scored_tokens=res.tokens, tokens_processed=res.processed, phase="prefill",
                              density=meter.density(), density_prefill=meter.density("prefill"),
                              density_decode=meter.density("decode"))
                wall = time.perf_counter() - t0
    record.update(wall_s=round(wall, 3), tokens_per_s=round(record.pop("tokens_processed") / max(wall, 1e-9), 1),
                  peak_mem_bytes=mem.peak_bytes, device=str(device), dtype=str(next(model.parameters()).dtype),
                  versions=versions(), finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return record


def _task_samples(tokenizer, cell: Cell, resources: Resources):
    task = make_task(cell.task, **cell.task_params)
    filler = resources.filler(cell.filler)
    fmt = PromptFormat(chat=cell.chat)
    return [task.make(tokenizer, cell.length, seed=cell.seed * 1_000_003 + i, filler=filler, depth=d, prompt=fmt)
            for i, d in enumerate(sample_depths(cell.samples))]


def sample_depths(n: int) -> list[float]:
    """Needle depths spread evenly over the context (the first asked needle of multi-needle tasks)."""
    return [i / (n - 1) for i in range(n)] if n > 1 else [0.5]


def _run_task(model, tokenizer, cell: Cell, model_name: str, samples, batch_size: int, meter, done: dict,
              on_samples, progress: bool) -> dict:
    dtype = str(next(model.parameters()).dtype)
    todo = [i for i in range(len(samples)) if i not in done]
    records = dict(done)
    new_tokens = new_wall = 0.0
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), disable=not progress, unit="prompt",
               desc=f"{cell.task} @ {cell.length} {cell.method}", leave=False)
    for b in range(0, len(todo), batch_size):
        idx = todo[b:b + batch_size]
        batch = [samples[i] for i in idx]
        before = (dict(meter.attended), dict(meter.causal))
        stats: dict = {}
        t0 = time.perf_counter()
        answers = generate_answers(model, tokenizer, batch, batch_size=len(batch), stats=stats)
        wall = time.perf_counter() - t0
        scores = score_answers(batch, answers)
        share = 1 / len(batch)  # a batch's counts and time, split evenly over its prompts
        fresh = []
        for i, s, answer, sc in zip(idx, batch, answers, scores):
            fresh.append({
                "record": "sample", "cell": cell.key(), "index": i, "task": cell.task, "method": cell.method,
                "params": cell.params, "layers": cell.layers, "length": cell.length, "model": model_name,
                "dtype": dtype, "chat": cell.chat, "depth": s.meta["depths"][0] if "depths" in s.meta else None,
                "answers": s.answers,
                "prediction": answer, "score": sc[s.metrics[0]], "scores": sc, "prompt_tokens": len(s.input_ids),
                "new_tokens": stats["new_tokens"] * share, "wall_s": round(wall * share, 4),
                "batch_size": len(batch), "kv_cache_bytes": stats["kv_cache_bytes"],
                "attended": {p: (meter.attended[p] - before[0][p]) * share for p in meter.attended},
                "causal": {p: (meter.causal[p] - before[1][p]) * share for p in meter.causal}})
        records.update((r["index"], r) for r in fresh)
        if on_samples is not None:
            on_samples(fresh)
        new_tokens += stats["prompt_tokens"] + stats["new_tokens"]
        new_wall += wall
        bar.update(len(batch))
        bar.set_postfix_str(f"{new_tokens / max(new_wall, 1e-9):.0f} tok/s")
    bar.close()
    rows = [records[i] for i in range(len(samples))]
    metrics = samples[0].metrics
    means = {m: sum(r["scores"][m] for r in rows) / len(rows) for m in metrics}
    score, lo, hi = mean_ci95([r["score"] for r in rows])

    def density(phase=None):
        phases = [phase] if phase else ["prefill", "decode"]
        causal = sum(r["causal"][p] for r in rows for p in phases)
        return None if causal == 0 else sum(r["attended"][p] for r in rows for p in phases) / causal

    return {"score": score, "score_ci95": [lo, hi], "n": len(rows), "metric": metrics[0], "scores": means,
            "phase": "prefill+decode", "density": density(), "density_prefill": density("prefill"),
            "density_decode": density("decode"),
            "kv_cache_bytes": sum(r["kv_cache_bytes"] for r in rows) // len(rows),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows), "resumed_samples": len(done),
            "generated_tokens": sum(r["new_tokens"] for r in rows), "tokens_processed": new_tokens,
            "new_wall_s": new_wall, "sample_wall_s": round(sum(r["wall_s"] for r in rows), 3),
            "predictions": [rows[i]["prediction"] for i in range(min(3, len(rows)))]}
