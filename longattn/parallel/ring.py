"""Ring attention: K/V blocks travel around the ranks while each rank attends its queries to them.

Liu et al. 2023, Ring Attention with Blockwise Transformers for Near-Infinite Context (arXiv:2310.01889);
ring self-attention from Li et al. 2021, Sequence Parallelism (arXiv:2105.13120).

Forward: at step i rank r holds the K/V of rank r-i; it starts passing them on (batched isend/irecv) before
attending to them, so the transfer overlaps the compute, and merges each block with the log-sum-exp.
Backward (explicit: P2P ops carry no autograd): K/V go around again; each rank adds its queries' dK/dV for the
K/V it holds to an accumulator that travels with them, so after P hops every accumulator is back at its
owner. Only the KV heads travel (GQA stays unexpanded).

Memory per rank beyond the inputs: the float32 output and LSE, the float32 dQ, at most two K/V sets (the one in
hand and the one arriving; one when P = 2) and two float32 dK/dV accumulators (the one leaving and the one
arriving; the last one to arrive is this rank's dK/dV), plus one block's kernel temporaries at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import check_backend
from .comm import DEFAULT_TIMEOUT_S, Ring, require_distributed
from .local import attend_runs, attend_runs_backward
from .patterns import CAUSAL, BlockPattern, Run
from .sharding import ShardLayout


@dataclass
class RingPlan:
    """What every rank of a ring agrees on: the position runs each rank holds (ring order), the pattern."""

    runs: list[list[Run]]
    pattern: BlockPattern = CAUSAL
    scale: float = 1.0
    backend: str = "auto"


def ring_forward(q, k, v, plan: RingPlan, ring: Ring):
    """(out in q's dtype, lse float32) of this rank's queries over the whole sequence."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    kv, mine = [k, v], plan.runs[ring.rank]
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        # Receive the next block (into new buffers) while attending to this one; once both are done the block
        # just used is dropped, so two K/V sets are alive at a time.
        pending = ring.start(kv) if step < ring.size - 1 else None
        attend_runs(q, kv[0], kv[1], mine, plan.runs[src], plan.pattern, plan.scale, plan.backend, out, lse)
        if pending is not None:
            kv = ring.finish(pending, f"ring attention forward (step {step}, K/V)")
            del pending
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, plan: RingPlan, ring: Ring):
    """(dq, dk, dv) of this rank's q, k, v.

    dK/dV accumulate directly in float32 buffers that travel around the ring: at each step the rank takes the
    accumulator of the K/V it holds from the previous rank, adds its blocks' gradients and passes it on. That
    needs no separate per-step dK/dV buffer; the price is that the dK/dV transfer is not hidden behind compute
    (the K/V transfer still is). Buffers are allocated when an exchange starts and dropped when it ends, in an
    order that keeps two K/V sets but ONE accumulator alive while the kernels run, and two accumulators only
    during the dK/dV exchange, when the kernels' temporaries and the K/V block just used are gone."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    mine = plan.runs[ring.rank]
    if ring.size == 1:
        dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v))
        attend_runs_backward(dout, q, k, v, out, lse, mine, mine, plan.pattern, plan.scale, plan.backend, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    kv, dkv_pending = [k, v], None
    for step in range(ring.size):
        src = (ring.rank - step) % ring.size
        if dkv_pending is None:  # step 0: this rank starts the accumulator of its own K/V
            dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in kv]
        else:  # the accumulator of rank `src`'s K/V from the previous rank; the one this rank sent is gone
            dkv = ring.finish(dkv_pending, f"ring attention backward (step {step}, dK/dV)")
            dkv_pending = None  # it holds the accumulator this rank sent
        kv_pending = ring.start(kv) if step < ring.size - 1 else None
        attend_runs_backward(dout, q, kv[0], kv[1], out, lse, mine, plan.runs[src], plan.pattern, plan.scale,
                             plan.backend, dq, dkv[0], dkv[1])
        if kv_pending is not None:
            kv = ring.finish(kv_pending, f"ring attention backward (step {step}, K/V)")
            del kv_pending
        dkv_pending = ring.start(dkv)
        del dkv  # the send keeps it until the exchange finishes
    del kv  # the K/V blocks are done with: free them before dK/dV come home
    dk, dv = ring.finish(dkv_pending, "ring attention backward (dK/dV back to their owner)")
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Thin autograd wrapper around ring_forward / ring_backward."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, ring: Ring):
        out, lse = ring_forward(q, k, v, plan, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.ring = plan, ring
        return out

    @staticmethod
    def backward(ctx, dout):
        dq, dk, dv = ring_backward(dout, *ctx.saved_tensors, ctx.plan, ctx.ring)
        return dq, dk, dv, None, None


def check_qkv(q, k, v, what: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{what}: q, k, v must be [batch, heads, local_seq, head_dim], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{what}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{what}: query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")


def ring_attention_runs(q, k, v, runs: list[list[Run]], group=None, *, pattern: BlockPattern = CAUSAL,
                        scale: float | None = None, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Ring attention where rank i of `group` holds the absolute positions `runs[i]` (any layout)."""
    check_qkv(q, k, v, "ring_attention")
    check_backend(backend)
    ring = Ring(group, timeout_s)
    if len(runs) != ring.size:
        raise ValueError(f"ring_attention: runs for {len(runs)} ranks but the group has {ring.size}")
    local = sum(n for _, n in runs[ring.rank])
    if local != q.shape[2]:
        raise ValueError(f"ring_attention: rank {ring.rank} holds {q.shape[2]} positions but its runs cover {local}")
    plan = RingPlan(runs, pattern, q.shape[-1] ** -0.5 if scale is None else scale, backend)
    return RingAttentionFunction.apply(q, k, v, plan, ring)


def ring_attention(q, k, v, group=None, *, layout: str | ShardLayout = "zigzag", pattern: BlockPattern = CAUSAL,
                   scale: float | None = None, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Exact attention of this rank's shard (q, k, v: [B, H, S/P, D], sharded with `layout`) over the full
    sequence; returns this rank's output shard. Differentiable."""
    require_distributed("ring_attention")
    import torch.distributed as dist

    world = dist.get_world_size(group)
    layout = ShardLayout.resolve(layout, world, "ring_attention")
    return ring_attention_runs(q, k, v, layout.all_runs(q.shape[2] * world), group, pattern=pattern, scale=scale,
                               backend=backend, timeout_s=timeout_s)
