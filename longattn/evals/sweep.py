"""Sweeps: a TOML grid of methods x parameters x tasks x lengths, run into a JSONL file that resumes.

    name = "window-vs-dense"
    model = "reference"            # a name of `longattn models` (reference, smollm2-135m-instruct, ...) or a HF folder
    dtype = "float32"              # float32, bfloat16 or float16 (`--dtype` overrides)
    chat = false                   # task prompts in the tokenizer's chat template
    seed = 0
    samples = 20                   # prompts per task cell
    batch_size = 8
    lengths = [1024, 2048, 4096]
    tasks = ["passkey", "niah_single"]   # or tables: { name = "niah_multikey", needles = 8 }
    filler = "grass"               # "grass", "python-doc" or a text file

    [[methods]]
    method = "dense"

    [[methods]]
    method = "sliding_window"
    grid = { window = [256, 512, 1024] }   # every combination of the listed values
    params = { backend = "sdpa" }          # fixed parameters
    layers = "all"

    [perplexity]                   # optional: perplexity vs context length
    text = "python-doc"
    lengths = [512, 1024, 2048, 4096]
    tokens = 16384

Each finished prompt and each finished cell is appended to the results file as one JSON line, flushed and
fsynced, so a killed sweep loses at most the batch of prompts in flight; a restart skips every cell already
recorded and resumes a cell from its recorded prompts.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .runner import Cell, Resources, run_cell
from .shards import Shard, merge_results, shard_files, unique_records

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SWEEP_FIELDS = {"name", "model", "dtype", "chat", "seed", "samples", "batch_size", "lengths", "tasks", "filler",
                "methods", "perplexity", "description"}


@dataclass
class Sweep:
    name: str
    model: str
    cells: list[Cell]
    batch_size: int = 8
    dtype: str = "float32"
    source: Path | None = None
    description: str = ""
    config: dict = field(default_factory=dict)


def _err(path, msg):
    return ValueError(f"{path}: {msg}")


def load_sweep(path) -> Sweep:
    """Parse and validate a sweep file into its cells (errors name the file and the offending entry)."""
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise _err(path, f"not valid TOML ({e})") from None
    return sweep_from_config(cfg, path)


def sweep_from_config(cfg: dict, path) -> Sweep:
    """Validate a sweep configuration (as parsed from TOML) into its cells; `path` names it in errors."""
    from ..patching import resolve_kv_cache
    from .tasks import make_task

    path = Path(path)
    unknown = set(cfg) - SWEEP_FIELDS
    if unknown:
        raise _err(path, f"unknown field(s) {sorted(unknown)}; allowed: {sorted(SWEEP_FIELDS)}")
    methods = cfg.get("methods")
    if not methods or not isinstance(methods, list):
        raise _err(path, "needs at least one [[methods]] entry")
    from ..pretrained import check_model_spec, resolve_dtype

    seed, samples, filler = cfg.get("seed", 0), cfg.get("samples", 10), cfg.get("filler", "grass")
    chat = cfg.get("chat", False)
    if not isinstance(chat, bool):
        raise _err(path, f"chat must be true or false, got {chat!r}")
    try:
        resolve_dtype(cfg.get("dtype", "float32"))
        check_model_spec(cfg.get("model", "reference"))
    except (ValueError, FileNotFoundError) as e:
        raise _err(path, str(e)) from None
    tasks = []
    for t in cfg.get("tasks", []):
        spec = {"name": t} if isinstance(t, str) else dict(t)
        name = spec.pop("name", None)
        try:
            make_task(name, **spec)  # validate now, not an hour into the sweep
        except ValueError as e:
            raise _err(path, f"tasks: {e}") from None
        tasks.append((name, spec))
    lengths = cfg.get("lengths", [])
    if tasks and not lengths:
        raise _err(path, "tasks need 'lengths'")
    if any(not isinstance(n, int) or n < 16 for n in lengths):
        raise _err(path, f"lengths must be integers >= 16, got {lengths}")
    ppl = cfg.get("perplexity")
    if not tasks and not ppl:
        raise _err(path, "nothing to run: give 'tasks' and/or a [perplexity] table")

    cells = []
    for i, entry in enumerate(methods):
        if not isinstance(entry, dict) or "method" not in entry:
            raise _err(path, f"methods[{i}] needs a 'method'")
        extra = set(entry) - {"method", "params", "grid", "layers"}
        if extra:
            raise _err(path, f"methods[{i}]: unknown field(s) {sorted(extra)}")
        grid = entry.get("grid", {})
        names = sorted(grid)
        for combo in itertools.product(*(grid[n] if isinstance(grid[n], list) else [grid[n]] for n in names)):
            params = {**entry.get("params", {}), **dict(zip(names, combo))}
            try:  # validated exactly as patch() will take it (attention method and/or KV-cache policy)
                policy = resolve_kv_cache(entry["method"], params.get("kv_cache"),
                                          {k: v for k, v in params.items() if k != "kv_cache"})[2]
            except ValueError as e:
                raise _err(path, f"methods[{i}]: {e}") from None
            for (task, task_params), length in itertools.product(tasks, lengths):
                cells.append(Cell("task", entry["method"], length, params, entry.get("layers"), task, task_params,
                                  samples, seed, filler, chat=chat))
            if ppl and policy is None:  # a KV policy only acts while generating: no perplexity cells
                for length in ppl.get("lengths", []):
                    cells.append(Cell("perplexity", entry["method"], length, params, entry.get("layers"),
                                      seed=seed, text=ppl.get("text", "python-doc"),
                                      tokens=ppl.get("tokens", 16384), stride=ppl.get("stride")))
    return Sweep(cfg.get("name", path.stem), cfg.get("model", "reference"), cells, cfg.get("batch_size", 8),
                 cfg.get("dtype", "float32"), path, cfg.get("description", ""), cfg)


def read_results(path) -> list[dict]:
    """Records of a results file. A torn last line (a kill mid-write) is dropped; any other bad line is an
    error naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break  # the cell in flight when the sweep was killed: it will be run again
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def _repair_tail(path: Path) -> None:
    """Cut a torn final line so that new records start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])


def run_sweep(sweep: Sweep, out: Path, dry_run: bool = False, model_and_tokenizer=None, progress: bool = True,
              dtype=None, device="auto", shard: Shard | None = None) -> list[dict]:
    """Run every cell not yet in `out` (or, with `shard`, that shard's cells); returns all records (old and new).
    `dtype` overrides the sweep's; `model_and_tokenizer` (model, tokenizer) is used instead of loading the sweep's
    model."""
    return run_cells(sweep.cells, out, sweep.model, dtype or sweep.dtype, device, sweep.batch_size, sweep.name,
                     dry_run, model_and_tokenizer, progress, shard=shard)


def recorded_work(cells: list[Cell], out: Path | None, model: str, dtype):
    """(records, finished cell keys, {cell key: {index: sample}} of unfinished cells) of `out` and its shard
    files, after checking that they hold this model in this dtype."""
    from ..pretrained import model_label, resolve_dtype

    existing = unique_records([r for p in [out, *shard_files(out)] for r in read_results(p)]) if out else []
    name, torch_dtype = model_label(model), str(resolve_dtype(dtype))
    for r in existing:  # one results file holds one model in one dtype: resuming across them would mix results
        other = (model_label(r.get("model", name)), r.get("dtype", "torch.float32"))
        if other != (name, torch_dtype):
            raise ValueError(f"{out} holds results of model {other[0]} in {other[1]}; this run is {name} in "
                             f"{torch_dtype}: choose another results file")
    done = {r["cell"] for r in existing if r.get("record", "cell") == "cell" and "cell" in r}
    partial: dict[str, dict[int, dict]] = {}
    for r in existing:
        if r.get("record") == "sample" and r["cell"] not in done:
            partial.setdefault(r["cell"], {})[r["index"]] = r
    return existing, done, partial


def append_records(path: Path | None, records: list[dict]) -> None:
    """Append records as JSON lines, flushed and fsynced (what a kill cannot take back)."""
    if path is None:
        return
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def finish(cells: list[Cell], out: Path | None, model: str, dtype, new: list[dict]) -> list[dict]:
    """All records after a run: shard files are merged into `out` once every cell of the sweep is recorded."""
    if out is None:
        return new
    records, done, _ = recorded_work(cells, out, model, dtype)
    if not shard_files(out):
        return read_results(out)
    missing = sum(c.key() not in done for c in cells)
    if missing:
        print(f"{missing} of {len(cells)} cells are still to run in other shards; the last shard to finish merges "
              f"them into {out} (or: longattn sweep FILE --merge)")
        return records
    return merge_results(out, remove_shard_files=True)


def run_cells(cells: list[Cell], out, model: str, dtype="float32", device="auto", batch_size: int = 8,
              sweep_name: str | None = None, dry_run: bool = False, model_and_tokenizer=None,
              progress: bool = True, echo=None, shard: Shard | None = None) -> list[dict]:
    """Run the cells not yet finished in `out` (None: keep nothing), appending every finished prompt and cell as
    one fsynced JSON line; a cell interrupted mid-way resumes from its recorded prompts. With `shard`, only its
    cells run, into its own file beside `out`. Returns all records. `echo(record)` is called with each finished
    cell record."""
    from ..pretrained import load_model, model_label

    out = Path(out) if out is not None else None
    existing, done, partial = recorded_work(cells, out, model, dtype)
    mine = shard.owns(cells) if shard is not None else cells
    todo = [c for c in mine if c.key() not in done]
    if dry_run:
        for c in mine:
            state = "done" if c.key() in done else "todo"
            what = f"{c.task}" if c.kind == "task" else f"perplexity[{c.text}]"
            print(f"[{state}] {c.method} {c.params or ''} {what} @ {c.length}")
        of = f" of shard {shard}" if shard is not None else ""
        print(f"{len(mine)} cells{of}, {len(mine) - len(todo)} done, {len(todo)} to run")
        return existing
    if echo is not None and len(todo) < len(mine):
        print(f"{len(mine) - len(todo)} of {len(mine)} cells already finished in {out}")
    if not todo:
        return finish(cells, out, model, dtype, [])
    mdl, tok = model_and_tokenizer or load_model(model, dtype=dtype, device=device)
    resources = Resources(tok)
    target = shard.results_file(out) if shard is not None and out is not None else out
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(target)
    new = []

    def append(records):
        append_records(target, records)

    desc = f"sweep {sweep_name}" if sweep_name else "cells"
    bar = tqdm(todo, desc=desc + (f" [shard {shard}]" if shard is not None else ""), disable=not progress,
               unit="cell")
    for cell in bar:
        bar.set_postfix_str(f"{cell.method} {cell.task or 'ppl'} @ {cell.length}")
        record = run_cell(mdl, tok, cell, model_label(model), resources, batch_size,
                          done_samples=partial.get(cell.key()), on_samples=append, progress=progress)
        if sweep_name:
            record["sweep"] = sweep_name
        append([record])
        new.append(record)
        if echo is not None:
            echo(record)
    return finish(cells, out, model, dtype, new)
