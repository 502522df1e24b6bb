"""DeepSpeed-Ulysses: an all-to-all turns sequence shards into head shards, attention runs on the whole
sequence for H/P heads, and a second all-to-all turns it back (Jacobs et al. 2023, arXiv:2309.14509).

The all-to-all's backward is the opposite all-to-all. Heads (KV heads for GQA: only they are exchanged) must
be divisible by the group size. `usp_attention` composes Ulysses inside a group with a ring across groups
(the 2D "unified sequence parallelism" arrangement).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .blocks import check_backend
from .comm import DEFAULT_TIMEOUT_S, require_distributed, wait_all
from .local import LocalRunsAttention
from .patterns import CAUSAL, BlockPattern, Run
from .ring import check_qkv, ring_attention_runs
from .sharding import ShardLayout


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int, timeout_s: float) -> torch.Tensor:
    """Split `x` along `scatter_dim` into P pieces, send piece j to rank j, concatenate what arrives along
    `gather_dim` (in rank order)."""
    size = dist.get_world_size(group)
    if size == 1:
        return x
    send = [t.contiguous() for t in x.chunk(size, dim=scatter_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(size)]
    work = dist.all_to_all(recv, send, group=group, async_op=True)
    wait_all([work], timeout_s, "Ulysses all-to-all")
    return torch.cat(recv, dim=gather_dim)


class AllToAll(torch.autograd.Function):
    """Differentiable all-to-all: the gradient goes back through the opposite exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int, timeout_s: float):
        ctx.args = (group, scatter_dim, gather_dim, timeout_s)
        return _all_to_all(x, group, scatter_dim, gather_dim, timeout_s)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim, timeout_s = ctx.args
        return _all_to_all(grad, group, gather_dim, scatter_dim, timeout_s), None, None, None, None


def seq_to_heads(x, group, timeout_s: float = DEFAULT_TIMEOUT_S):
    """[B, H, S/P, D] sequence shard -> [B, H/P, S, D] head shard (sequence in rank order)."""
    return AllToAll.apply(x, group, 1, 2, timeout_s)


def heads_to_seq(x, group, timeout_s: float = DEFAULT_TIMEOUT_S):
    """[B, H/P, S, D] head shard -> [B, H, S/P, D] sequence shard."""
    return AllToAll.apply(x, group, 2, 1, timeout_s)


def check_heads(q, k, size: int, what: str) -> None:
    if q.shape[1] % size or k.shape[1] % size:
        raise ValueError(f"{what}: query heads ({q.shape[1]}) and KV heads ({k.shape[1]}) must both be divisible by "
                         f"the Ulysses group size {size}; use ring attention (or a smaller Ulysses group) instead")


def ulysses_attention_runs(q, k, v, runs: list[list[Run]], group=None, *, pattern: BlockPattern = CAUSAL,
                           scale: float | None = None, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Ulysses attention where rank i of `group` holds the absolute positions `runs[i]`."""
    check_qkv(q, k, v, "ulysses_attention")
    check_backend(backend)
    size = dist.get_world_size(group)
    check_heads(q, k, size, "ulysses_attention")
    if len(runs) != size:
        raise ValueError(f"ulysses_attention: runs for {len(runs)} ranks but the group has {size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (seq_to_heads(t, group, timeout_s) for t in (q, k, v))
    # After the exchange the sequence is every rank's shard in rank order: exactly the concatenated runs.
    out = LocalRunsAttention.apply(qh, kh, vh, [r for rank_runs in runs for r in rank_runs], pattern, scale, backend)
    return heads_to_seq(out, group, timeout_s)


def ulysses_attention(q, k, v, group=None, *, layout: str | ShardLayout = "zigzag", pattern: BlockPattern = CAUSAL,
                      scale: float | None = None, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Exact attention of this rank's shard over the full sequence via all-to-all over heads. Differentiable."""
    require_distributed("ulysses_attention")
    world = dist.get_world_size(group)
    layout = ShardLayout.resolve(layout, world, "ulysses_attention")
    return ulysses_attention_runs(q, k, v, layout.all_runs(q.shape[2] * world), group, pattern=pattern, scale=scale,
                                  backend=backend, timeout_s=timeout_s)


def usp_groups(sp_ranks: list[int], ulysses_size: int):
    """(this rank's Ulysses group, its ring group) for sequence-parallel ranks `sp_ranks` (global ranks, SP
    order): SP rank i is Ulysses member i % U of ring member i // U. Every process must call this (new_group)."""
    if len(sp_ranks) % ulysses_size:
        raise ValueError(f"usp_groups: {len(sp_ranks)} sequence-parallel ranks are not divisible by the Ulysses "
                         f"size {ulysses_size}")
    me = dist.get_rank()
    u_group = r_group = None
    n_ring = len(sp_ranks) // ulysses_size
    for j in range(n_ring):  # Ulysses groups: consecutive SP ranks
        ranks = sp_ranks[j * ulysses_size:(j + 1) * ulysses_size]
        g = dist.new_group(ranks)
        if me in ranks:
            u_group = g
    for u in range(ulysses_size):  # ring groups: the same Ulysses slot in every Ulysses group
        ranks = sp_ranks[u::ulysses_size]
        g = dist.new_group(ranks)
        if me in ranks:
            r_group = g
    return u_group, r_group


def usp_attention(q, k, v, ulysses_group, ring_group, *, layout: str | ShardLayout = "zigzag",
                  pattern: BlockPattern = CAUSAL, scale: float | None = None, backend: str = "auto",
                  timeout_s: float = DEFAULT_TIMEOUT_S):
    """2D sequence parallelism: Ulysses (all-to-all over heads) inside `ulysses_group`, ring attention across
    `ring_group` (groups from `usp_groups`; SP rank = ring rank * U + Ulysses rank, sharded with `layout` over
    U * R ranks). Differentiable."""
    check_qkv(q, k, v, "usp_attention")
    u, r = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    check_heads(q, k, u, "usp_attention")
    world = u * r
    layout = ShardLayout.resolve(layout, world, "usp_attention", groups=f"Ulysses x ring ({u} x {r}) is")
    sp_runs = layout.all_runs(q.shape[2] * world)
    # Ring member j holds, after its Ulysses exchange, the shards of SP ranks j*U ... j*U + U - 1 in that order.
    ring_runs = [[run for i in range(j * u, (j + 1) * u) for run in sp_runs[i]] for j in range(r)]
    qh, kh, vh = (seq_to_heads(t, ulysses_group, timeout_s) for t in (q, k, v))
    out = ring_attention_runs(qh, kh, vh, ring_runs, ring_group, pattern=pattern, scale=scale, backend=backend,
                              timeout_s=timeout_s)
    return heads_to_seq(out, ulysses_group, timeout_s)
