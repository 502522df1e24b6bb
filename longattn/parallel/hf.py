"""Running a patched Hugging Face model on a sharded sequence, and the loss and gradients that go with it.

Each rank of a sequence-parallel group passes its shard of input_ids and the matching global position_ids
(`ShardLayout.shard` / `ShardLayout.positions`); every patched attention layer then runs ring (or Ulysses)
attention with the method's pattern. Embeddings, norms and MLPs are per-token, so they need nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..kernels.masks import AttentionMask
from .blocks import check_backend
from .comm import DEFAULT_TIMEOUT_S, check_group_size
from .patterns import CAUSAL, BlockPattern, MaskBlockPattern
from .ring import ring_attention
from .sharding import IGNORE_INDEX, LAYOUTS, ShardLayout
from .ulysses import ulysses_attention, usp_attention, usp_groups

STRATEGIES = ("ring", "ulysses", "usp")


@dataclass
class SequenceParallel:
    """How a patched model's attention runs over a sequence-parallel group.

    Parameters
    ----------
    group : ProcessGroup or None
        The ranks that share one sequence (None: the default, world, group).
    size : int or None
        The group size you expect; checked against the group (a mismatched launch fails at patch time).
    strategy : str
        "ring" (K/V travel around the ranks), "ulysses" (all-to-all over heads; heads and KV heads divisible
        by the group size), or "usp" (Ulysses within sub-groups of `ulysses_size` consecutive ranks, ring
        across them).
    ulysses_size : int
        Ranks per Ulysses sub-group with strategy "usp" (heads and KV heads divisible by it).
    usp_groups : tuple or None
        Strategy "usp": this rank's (Ulysses group, ring group), from `longattn.parallel.usp_groups`. None: patch()
        creates them, which every rank of the world must then call at the same time (new_group is collective);
        when several sequence-parallel groups share the world, create every group's sub-groups on every rank
        and pass this rank's here.
    layout : str
        "zigzag" (balanced causal work) or "contiguous": how the caller sharded the sequence.
    backend : str
        Block kernels: "auto", "sdpa", "flash" (CUDA + flash-attn), "math".
    timeout_s : float
        Longest wait for a peer before a SequenceParallelError.
    """

    group: object = None
    size: int | None = None
    strategy: str = "ring"
    layout: str = "zigzag"
    ulysses_size: int = 1
    backend: str = "auto"
    timeout_s: float = DEFAULT_TIMEOUT_S
    pattern: BlockPattern | MaskBlockPattern = CAUSAL  # set by patch() from the method
    usp_groups: tuple | None = None
    count_pairs: Callable | None = None  # the method's pair counter over an AttentionMask, set by patch()
    pair_counts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"sequence_parallel strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"sequence_parallel layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        check_backend(self.backend)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard_layout(self) -> ShardLayout:
        return ShardLayout(self.layout, self.world)


def as_sequence_parallel(value) -> SequenceParallel:
    """A SequenceParallel from what `patch(..., sequence_parallel=...)` accepts: a SequenceParallel, a
    ProcessGroup, or an int (the expected size of the default group)."""
    if isinstance(value, SequenceParallel):
        return value
    if isinstance(value, bool):
        raise TypeError("sequence_parallel: expected a SequenceParallel, a ProcessGroup or a group size, got a bool")
    if isinstance(value, int):
        return SequenceParallel(size=value)
    if isinstance(value, dist.ProcessGroup):
        return SequenceParallel(group=value)
    raise TypeError(f"sequence_parallel: expected a SequenceParallel, a ProcessGroup or a group size, got "
                    f"{type(value).__name__}")


def sequence_parallel_for(value, method, all_layers: bool) -> SequenceParallel:
    """The resolved, checked SequenceParallel for a method spec (duck-typed: its `name` and `params()`)."""
    sp = as_sequence_parallel(value)
    if not all_layers:
        raise ValueError("sequence_parallel needs every attention layer patched (an unpatched layer would attend "
                         "only within its own shard); drop `layers=`")
    pattern = method.block_pattern()
    world = check_group_size(sp.group, sp.size)
    if sp.strategy == "usp" and sp.usp_groups is None:
        ranks = [dist.get_global_rank(sp.group, i) if sp.group is not None else i for i in range(world)]
        sp = replace(sp, usp_groups=usp_groups(ranks, sp.ulysses_size))
    if sp.strategy == "usp":
        u, r = (dist.get_world_size(g) for g in sp.usp_groups)
        if u != sp.ulysses_size or u * r != world:
            raise ValueError(f"sequence_parallel usp_groups: Ulysses group of {u} x ring group of {r} ranks, but "
                             f"ulysses_size is {sp.ulysses_size} and the sequence-parallel group has {world} ranks")
    return replace(sp, pattern=pattern, count_pairs=method.computed_pairs, pair_counts={})


def _check_positions(sp: SequenceParallel, position_ids, local_len: int) -> None:
    if position_ids is None:
        return
    expected = sp.shard_layout().positions(sp.rank, local_len * sp.world, device=position_ids.device)
    if position_ids.shape[-1] != local_len or not bool((position_ids == expected).all()):
        raise ValueError(f"sequence_parallel: rank {sp.rank}'s position_ids are not its {sp.layout} shard of "
                         f"positions 0..{local_len * sp.world - 1}; pass ShardLayout('{sp.layout}', {sp.world})"
                         f".positions(rank, seq_len) with the input_ids shard")


def layer_pattern(sp: SequenceParallel, sliding_window=None) -> BlockPattern | MaskBlockPattern:
    """The pattern a layer runs: the method's, intersected with the model's own window (Mistral, Qwen2, ...)."""
    return sp.pattern.with_window(sliding_window) if sliding_window else sp.pattern


def sequence_parallel_pairs(sp: SequenceParallel, local_len: int, sliding_window=None) -> tuple[int, int]:
    """(attended, causal) query-key pairs per sequence of one layer's attention over the FULL sharded sequence
    (local_len x group size positions), the same on every rank: the density meter's numerator and
    denominator. The ranks' (query run, key run) blocks tile the whole square, so their allowed pairs are the
    method's pairs over the full sequence, counted by the method itself (`sp.count_pairs`, set by patch()) as in
    one process; fully masked blocks, which the ring skips, add none."""
    key = (local_len * sp.world, sliding_window)
    if key not in sp.pair_counts:  # the same for every layer and forward at this length
        mask = AttentionMask.causal(key[0], window=sliding_window or None)
        sp.pair_counts[key] = sp.count_pairs(mask), mask.causal_pair_count()
    return sp.pair_counts[key]


def sequence_parallel_attention(sp: SequenceParallel, query, key, value, attention_mask=None, *, scale: float,
                                softcap=None, dropout: float = 0.0, sliding_window=None, position_ids=None):
    """One patched layer's attention on this rank's shard: [B, Hq, S/P, D] -> [B, Hq, S/P, D]."""
    if softcap is not None:
        raise NotImplementedError("sequence_parallel: logit soft-capping (Gemma 2) is not supported by the ring "
                                  "kernels")
    if dropout:
        raise NotImplementedError("sequence_parallel: attention dropout is not supported; set the model's "
                                  "attention_dropout to 0")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("sequence_parallel runs whole sequences (training / prefill) without a KV cache; "
                                  "call the model with use_cache=False")
    padding = getattr(attention_mask, "padding", None)
    if padding is not None and not bool(padding.all()):
        raise NotImplementedError("sequence_parallel does not support padding masks: pack sequences without "
                                  "padding (or pad at the end with labels -100: longattn.parallel.pad_for_sharding)")
    _check_positions(sp, position_ids, query.shape[2])
    pattern = layer_pattern(sp, sliding_window)
    kw = dict(layout=sp.shard_layout(), pattern=pattern, scale=scale, backend=sp.backend, timeout_s=sp.timeout_s)
    if sp.strategy == "ring":
        return ring_attention(query, key, value, sp.group, **kw)
    if sp.strategy == "ulysses":
        return ulysses_attention(query, key, value, sp.group, **kw)
    u_group, r_group = sp.usp_groups
    return usp_attention(query, key, value, u_group, r_group, **kw)


class _SumAcrossRanks(torch.autograd.Function):
    """Forward: all-reduce sum (every rank sees the global value). Backward: the gradient times the group size,
    so that the AVERAGE over the ranks' gradients (what FSDP2 / DDP reduce) is the sum of their shares."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.size = dist.get_world_size(group)
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.size, None


def count_tokens(labels, group=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels that count in the loss, summed over the group's ranks (float32 scalar, the same on every rank)."""
    count = (labels != ignore_index).sum().to(torch.float32)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(count, group=group)
    return count


def sequence_parallel_loss(logits, labels, group=None, ignore_index: int = IGNORE_INDEX, num_tokens=None):
    """Mean next-token cross-entropy over every token of every rank of `group` (the sequence-parallel ranks,
    and the data-parallel ones too when they should share one mean; labels shifted globally before sharding,
    see `shift_labels`), divided by `num_tokens` if given (e.g. a whole accumulated step's `count_tokens`). The
    value is the same on every rank. Its gradient is exact once AVERAGED over the group's ranks, which is the
    reduction FSDP2 (`fully_shard_model` over the same ranks) and DDP do."""
    total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                            reduction="sum")
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        total = _SumAcrossRanks.apply(total, group)
    count = count_tokens(labels, group, ignore_index) if num_tokens is None else num_tokens
    return total / count.clamp_min(1.0) if torch.is_tensor(count) else total / max(1.0, float(count))
