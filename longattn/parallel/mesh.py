"""The parallel layout of a training run as a named DeviceMesh (the torchtitan arrangement): data-parallel
replicas x data-parallel shards x sequence parallelism, the last split into ring x Ulysses.

Dimensions, slowest to fastest: ``dp_replicate`` (full copies of the sharded model; HSDP), ``dp_shard``
(FSDP2 shards; each its own batch), ``sp_ring`` and ``sp_ulysses`` (ranks that share one sequence). Flattened
dimensions built from them: ``sp`` (the sequence-parallel group, ring-major so that SP rank = ring rank x U +
Ulysses rank, the order `usp_attention` expects), ``dp_shard_sp`` (what FSDP2 shards over: weights, gradients
and optimizer state are split over the sequence ranks too, and the gradient reduction covers both) and ``dp``
(the ranks that see different data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .comm import DEFAULT_TIMEOUT_S

MESH_DIMS = ("dp_replicate", "dp_shard", "sp_ring", "sp_ulysses")
STRATEGIES = ("ring", "ulysses", "usp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each parallel dimension; their product is the world size.

    Parameters
    ----------
    dp_replicate, dp_shard : int
        Data-parallel replicas (each a full FSDP group) and FSDP2 shards per replica.
    sp : int
        Ranks that share one sequence (ring / Ulysses attention over it).
    strategy : str
        "ring", "ulysses" (heads divisible by `sp`) or "usp" (Ulysses over `ulysses_size` ranks, ring across).
    ulysses_size : int
        Strategy "usp" only: ranks per Ulysses sub-group (divides `sp`).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    strategy: str = "ring"
    ulysses_size: int = 1

    def __post_init__(self):
        for name in ("dp_replicate", "dp_shard", "sp", "ulysses_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelDims: {name} must be an integer >= 1, got {value!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ParallelDims: strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy != "usp" and self.ulysses_size != 1:
            raise ValueError(f"ParallelDims: ulysses_size is for strategy 'usp' (got {self.ulysses_size} with "
                             f"{self.strategy!r})")
        if self.sp % self.ulysses_size:
            raise ValueError(f"ParallelDims: ulysses_size {self.ulysses_size} must divide sp {self.sp}")

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.sp

    @property
    def dp(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def ring_size(self) -> int:
        return {"ring": self.sp, "ulysses": 1, "usp": self.sp // self.ulysses_size}[self.strategy]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.dp_replicate, self.dp_shard, self.ring_size, self.sp // self.ring_size

    @classmethod
    def for_world(cls, world: int, *, dp_replicate: int = 1, sp: int = 1, strategy: str = "ring",
                  ulysses_size: int = 1) -> "ParallelDims":
        """The dims with dp_shard taking every rank the other degrees leave (a clear error if they do not divide)."""
        rest = dp_replicate * sp
        if world % rest:
            raise ValueError(f"world size {world} is not divisible by dp_replicate {dp_replicate} x sequence "
                             f"parallel {sp} = {rest}; launch a multiple of {rest} processes")
        return cls(dp_replicate, world // rest, sp, strategy, ulysses_size)

    def build_mesh(self, device_type: str = "cpu") -> "TrainingMesh":
        """The named DeviceMesh of this run and its flattened dimensions (collective: every rank calls it)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build_mesh: torch.distributed is not initialized (launch with "
                               "accelerate launch / torchrun)")
        world = dist.get_world_size()
        if world != self.world:
            raise ValueError(f"ParallelDims: dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x sp "
                             f"{self.sp} = {self.world} ranks, but the world has {world}")
        root = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        dp_shard_sp = root["dp_shard", "sp_ring", "sp_ulysses"]._flatten("dp_shard_sp")
        if self.dp_replicate == 1:
            fsdp = dp_shard_sp
        else:  # HSDP: (replicate, shard), the shard dimension covering dp_shard x sp in the root's rank order
            fsdp = DeviceMesh(device_type, root.mesh.reshape(self.dp_replicate, -1),
                              mesh_dim_names=("dp_replicate", "dp_shard_sp"))
        return TrainingMesh(self, root, sp=root["sp_ring", "sp_ulysses"]._flatten("sp"), dp_shard_sp=dp_shard_sp,
                            dp=root["dp_replicate", "dp_shard"]._flatten("dp"), fsdp=fsdp)


@dataclass(frozen=True)
class TrainingMesh:
    """The mesh of a run: the root (MESH_DIMS), the flattened sp / dp_shard_sp / dp meshes it was built with, and
    `fsdp`, what FSDP2 shards over: dp_shard x sp, or (dp_replicate, dp_shard x sp) for HSDP."""

    dims: ParallelDims
    root: object
    sp: object
    dp_shard_sp: object
    dp: object
    fsdp: object

    def sequence_parallel(self, layout: str = "zigzag", backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
        """The SequenceParallel of this rank, on the mesh's sp dimension (None when sp is 1)."""
        from .hf import SequenceParallel

        d = self.dims
        if d.sp == 1:
            return None
        usp = (self.root["sp_ulysses"].get_group(), self.root["sp_ring"].get_group()) if d.strategy == "usp" else None
        return SequenceParallel(group=self.sp.get_group(), size=d.sp, strategy=d.strategy, layout=layout,
                                ulysses_size=d.ulysses_size if d.strategy == "usp" else 1, usp_groups=usp,
                                backend=backend, timeout_s=timeout_s)

    @property
    def sp_rank(self) -> int:
        """This rank's shard of its sequence."""
        return self.sp.get_local_rank()

    @property
    def dp_rank(self) -> int:
        """This rank's data index (ranks of one sequence-parallel group share it)."""
        return self.dp.get_local_rank()
