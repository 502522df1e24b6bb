"""Sweeps on Ray: every unfinished cell a Ray task with one device (a GPU where the cluster has them, else one
CPU), retried when its worker dies; the driver alone writes the results file, so each record is written once."""
from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from .runner import Cell, run_cell
from .sweep import append_records, finish, recorded_work

MAX_RETRIES = 3  # a worker killed mid-cell (OOM, preemption): the cell runs again from its recorded prompts
_LOADED: dict = {}  # per worker process: (model, dtype, device) -> (model, tokenizer), loaded once


def _cell_task(cell: Cell, model: str, dtype: str, device: str, batch_size: int, done_samples: dict | None,
               sweep_name: str | None) -> list[dict]:
    """Runs on a worker: one cell, returning its new prompt records followed by its cell record."""
    from ..pretrained import load_model, model_label

    key = (model, dtype, device)
    if key not in _LOADED:
        _LOADED.clear()  # one model per worker at a time
        _LOADED[key] = load_model(model, dtype=dtype, device=device, progress=None)
    mdl, tok = _LOADED[key]
    samples: list[dict] = []
    record = run_cell(mdl, tok, cell, model_label(model), batch_size=batch_size, done_samples=done_samples,
                      on_samples=samples.extend)
    if sweep_name:
        record["sweep"] = sweep_name
    return samples + [record]


def run_cells_ray(cells: list[Cell], out, model: str, dtype="float32", device="auto", batch_size: int = 8,
                  sweep_name: str | None = None, address: str | None = None, progress: bool = True) -> list[dict]:
    """Run the unfinished cells of `out` as Ray tasks (`address`: a running cluster, "auto", or None for a local
    instance); returns all records. Prompts recorded by an earlier, killed run are not run again."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ValueError("the Ray backend needs ray: pip install 'longattn[ray]'") from None
    out = Path(out)
    _, done, partial = recorded_work(cells, out, model, dtype)
    todo = [c for c in cells if c.key() not in done]
    if not todo:
        return finish(cells, out, model, dtype, [])
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(_cell_task).options(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                                          max_retries=MAX_RETRIES, retry_exceptions=False)
    device = "cuda" if gpus and device == "auto" else device  # Ray gives each task its own visible GPU
    out.parent.mkdir(parents=True, exist_ok=True)
    pending = {task.remote(c, model, dtype, device, batch_size, partial.get(c.key()), sweep_name): c
               for c in todo}
    new = []
    with tqdm(total=len(todo), desc=f"sweep {sweep_name or ''} [ray]", disable=not progress, unit="cell") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                records = ray.get(ready[0])
            except Exception as e:  # a cell that failed MAX_RETRIES + 1 times, or raised
                for ref in pending:
                    ray.cancel(ref)
                raise RuntimeError(f"cell {cell.method} {cell.params} {cell.task or 'perplexity'} @ {cell.length} "
                                   f"failed on Ray: {e}") from e
            append_records(out, records)
            new.append(records[-1])
            bar.update(1)
    return finish(cells, out, model, dtype, new)
