"""Sweeps spread over processes: shard i of N runs every N-th cell into its own results file; the files merge
into one. Works under SLURM arrays, torchrun / accelerate launch (one shard per rank) or by hand."""
from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

SHARD_FILE = re.compile(r"\.shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): it owns cells index, index + count, index + 2 count, ..."""

    index: int
    count: int

    def __post_init__(self):
        if not (isinstance(self.index, int) and isinstance(self.count, int) and 0 <= self.index < self.count):
            raise ValueError(f"shard {self.index}/{self.count}: expected 0 <= i < N")

    def owns(self, cells: list) -> list:
        return cells[self.index::self.count]

    def results_file(self, out: Path) -> Path:
        """Where this shard appends its records, next to the merged file: results.shard-0-of-2.jsonl."""
        return out.with_name(f"{out.stem}.shard-{self.index}-of-{self.count}{out.suffix}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """'i/N' (as --shard takes it; SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard expects i/N (e.g. 0/4), got {text!r}")
    return Shard(int(m.group(1)), int(m.group(2)))


def shard_from_launcher() -> tuple[Shard, int] | None:
    """(shard, local rank) when started by torchrun / accelerate launch with more than one process (they set
    RANK, WORLD_SIZE and LOCAL_RANK), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return None
    return Shard(int(os.environ["RANK"]), world), int(os.environ.get("LOCAL_RANK", "0"))


def shard_files(out: Path) -> list[Path]:
    """Every shard's results file of the merged file `out`, in shard order."""
    files = [p for p in out.parent.glob(f"{out.stem}.shard-*-of-*{out.suffix}") if SHARD_FILE.search(p.stem)]
    return sorted(files, key=lambda p: tuple(int(x) for x in SHARD_FILE.search(p.stem).groups()[::-1]))


def record_identity(r: dict):
    """What makes two records the same work: a cell by its key, a prompt by its cell and index."""
    kind = r.get("record", "cell")
    return (kind, r.get("cell"), r.get("index")) if kind == "sample" else (kind, r.get("cell"))


def unique_records(records: list[dict]) -> list[dict]:
    """The first record of each cell and prompt (a cell that two shard layouts both ran counts once)."""
    seen, out = set(), []
    for r in records:
        key = record_identity(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def merge_results(out: Path, remove_shard_files: bool = False) -> list[dict]:
    """Fold every shard file into `out` (atomically, under a lock, each cell and prompt once); returns the
    merged records. Shard files are removed only when asked (the caller knows no shard still writes)."""
    from .sweep import read_results

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = shard_files(out)
        records = unique_records([r for p in [out, *files] for r in read_results(p)])
        tmp = out.with_name(out.name + ".merging")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        if remove_shard_files:
            for p in files:
                p.unlink()
    return records
