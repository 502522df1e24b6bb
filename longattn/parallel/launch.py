"""Start a local process group (gloo) for tests and benchmarks, with a deadline instead of a possible hang."""
from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, backend, pg_timeout_s, threads, results, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        res = fn(rank, world, *args)
        results.put((rank, True, res))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0, backend: str = "gloo",
                    pg_timeout_s: float = 60.0, threads: int = 1, may_exit: tuple[int, ...] = ()) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined in a process group; returns
    the per-rank results. Raises RuntimeError with the failing rank's traceback, or TimeoutError after
    `timeout_s` (every child is then terminated). `fn` must be importable (module level). Ranks in `may_exit`
    may die without a result (None): tests of what the others do when a peer dies."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, backend, pg_timeout_s, threads, results, args),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"run_distributed: ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                for r in [r for r in dead if r in may_exit]:
                    got[r] = None
                dead = [r for r in dead if r not in may_exit]
                if dead:
                    raise RuntimeError(f"run_distributed: rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                                       f"without reporting a result")
                continue
            if not ok:
                raise RuntimeError(f"run_distributed: rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if len(got) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [got[r] for r in range(world_size)]
