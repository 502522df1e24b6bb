"""torch.distributed plumbing for sequence parallelism: the ring's neighbour exchange, groups, timeouts.

Every wait has a deadline: a peer that died or a rank that skipped a step turns into a RuntimeError that says
which exchange failed, instead of a hang.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class SequenceParallelError(RuntimeError):
    """A sequence-parallel collective failed or timed out (a rank died, or ranks disagree on what to run)."""


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """init_process_group from the launcher's environment (torchrun / accelerate), with a finite timeout."""
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"torch.distributed is not initialized and {missing} are not set: launch with torchrun "
                           f"or accelerate launch, or call torch.distributed.init_process_group yourself")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def require_distributed(what: str) -> None:
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed: launch with torchrun / accelerate launch (or call "
                           f"init_process_group) first")


def check_group_size(group, expected: int | None, what: str = "sequence_parallel") -> int:
    """The group's size; a clear error when it differs from what the caller asked for."""
    if not dist.is_initialized():
        raise RuntimeError(f"{what}: torch.distributed is not initialized (launch with torchrun or accelerate "
                           f"launch, then create the group)")
    size = dist.get_world_size(group)
    if expected is not None and size != expected:
        raise ValueError(f"{what}: requested size {expected} but the process group has {size} ranks "
                         f"(world size {dist.get_world_size()}); launch {expected} processes per sequence-parallel "
                         f"group or change the requested size")
    return size


def wait_all(works, timeout_s: float, what: str) -> None:
    """Wait for async work handles with a deadline; failures name the exchange and the likely cause."""
    for w in works:
        try:
            ok = w.wait(timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # gloo raises on a closed connection (peer died) or on its own timeout
            raise SequenceParallelError(
                f"{what} failed on rank {dist.get_rank()}: {type(e).__name__}: {e}. A peer rank probably died "
                f"or the ranks disagree on the sequence-parallel group / step count") from e
        if ok is False:
            raise SequenceParallelError(f"{what} timed out after {timeout_s:.0f} s on rank {dist.get_rank()}: "
                                        f"a peer rank is not taking part (dead, hung or in another step)")


@dataclass
class Ring:
    """Neighbour exchange over a group: each rank sends to rank+1 and receives from rank-1 (group order)."""

    group: object = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    rank: int = field(init=False)
    size: int = field(init=False)

    def __post_init__(self):
        require_distributed("ring attention")
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError(f"rank {dist.get_rank()} is not a member of the sequence-parallel group it was given")
        # P2POp takes global ranks; the ring is ordered by rank within the group.
        self._next = self._global((self.rank + 1) % self.size)
        self._prev = self._global((self.rank - 1) % self.size)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def start(self, tensors: list[torch.Tensor]):
        """Begin sending `tensors` to the next rank and receiving same-shaped ones from the previous rank into
        new buffers. The pending exchange holds the sent tensors until `finish`, so a caller can
        drop its own references as soon as the exchange has started."""
        if self.size == 1:
            return tensors, [], []
        recv = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        sends = [t.contiguous() for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self._next, self.group) for t in sends]
        ops += [dist.P2POp(dist.irecv, r, self._prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops), sends

    def finish(self, pending, what: str = "ring exchange") -> list[torch.Tensor]:
        recv, works, _ = pending
        wait_all(works, self.timeout_s, what)
        return recv
