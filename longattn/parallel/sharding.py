"""How a sequence is split over the ranks of a sequence-parallel group, and back.

"contiguous": rank r holds positions [r S/P, (r+1) S/P) (Li et al. 2021, Sequence Parallelism,
arXiv:2105.13120). Under a causal mask the last rank then does P times the work of the first.
"zigzag": the sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r, so that every rank holds
one early and one late chunk and does the same causal work (the layout of ring-flash-attn's zigzag variant
and of Llama 3's context parallelism).

Lengths must be divisible by the number of chunks (P or 2P); `pad_for_sharding` pads a causal LM batch at the
end (labels -100, positions continuing) so that the padding is never attended by a real token and never
counts in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .patterns import Run

LAYOUTS = ("zigzag", "contiguous")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ShardLayout:
    """A split of a sequence of `seq_len` positions over `world` ranks ("zigzag" or "contiguous")."""

    kind: str = "zigzag"
    world: int = 1

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {self.kind!r}")
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"layout world size must be an integer >= 1, got {self.world!r}")

    @classmethod
    def resolve(cls, layout: "ShardLayout | str", world: int, who: str, groups: str = "the group has") -> "ShardLayout":
        """`layout` (a ShardLayout or a kind name) for `world` ranks; a clear error naming `who` on a mismatch."""
        layout = cls(layout, world) if isinstance(layout, str) else layout
        if layout.world != world:
            raise ValueError(f"{who}: layout is for {layout.world} ranks but {groups} {world}")
        return layout

    @property
    def chunks(self) -> int:
        return 2 * self.world if self.kind == "zigzag" else self.world

    def check_length(self, seq_len: int) -> int:
        """The chunk length; a clear error when `seq_len` does not split evenly."""
        if seq_len % self.chunks:
            raise ValueError(
                f"sequence length {seq_len} is not divisible by {self.chunks} ({self.kind} layout over {self.world} "
                f"ranks needs {self.chunks} equal chunks); pad it with longattn.parallel.pad_for_sharding "
                f"(labels -100, positions continue) or choose another length")
        return seq_len // self.chunks

    def runs(self, rank: int, seq_len: int) -> list[Run]:
        """The runs of absolute positions rank `rank` holds, in its local order."""
        c = self.check_length(seq_len)
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} out of range for a layout over {self.world} ranks")
        if self.kind == "contiguous":
            return [(rank * c, c)]
        return [(rank * c, c), ((2 * self.world - 1 - rank) * c, c)]

    def all_runs(self, seq_len: int) -> list[list[Run]]:
        return [self.runs(r, seq_len) for r in range(self.world)]

    def positions(self, rank: int, seq_len: int, device="cpu") -> torch.Tensor:
        """[local_len] absolute positions of rank `rank` (the position_ids to pass with its shard)."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.runs(rank, seq_len)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """The part of a full-sequence tensor (sequence along `dim`) that rank `rank` holds."""
        seq_len = x.shape[dim]
        return torch.cat([x.narrow(dim, s, n) for s, n in self.runs(rank, seq_len)], dim=dim)

    def unshard_local(self, shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Reassemble the full sequence from every rank's shard (in rank order)."""
        if len(shards) != self.world:
            raise ValueError(f"expected {self.world} shards, got {len(shards)}")
        seq_len = sum(s.shape[dim] for s in shards)
        pieces = []
        for rank, shard in enumerate(shards):
            at = 0
            for start, n in self.runs(rank, seq_len):
                pieces.append((start, shard.narrow(dim, at, n)))
                at += n
        return torch.cat([p for _, p in sorted(pieces, key=lambda t: t[0])], dim=dim)

    def unshard(self, x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
        """The full sequence on every rank of `group`, gathered from the local shards (no gradient)."""
        got = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(got, x.contiguous(), group=group)
        return self.unshard_local(got, dim=dim)


def shift_labels(input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels over the FULL sequence (label t = token t+1, last = ignored): shift before sharding,
    because after sharding a rank does not hold the token that follows its last one."""
    return F.pad(input_ids[:, 1:], (0, 1), value=ignore_index)


def pad_for_sharding(input_ids: torch.Tensor, labels: torch.Tensor, layout: ShardLayout, pad_token_id: int = 0):
    """(input_ids, labels, position_ids) padded at the end to a length the layout splits evenly.

    Correct for causal attention only: padded tokens come last, so no real token attends to them; their labels
    are ignored and their positions continue the sequence (the rotary embedding of real tokens is unchanged).
    """
    b, s = input_ids.shape
    extra = (-s) % layout.chunks
    ids = F.pad(input_ids, (0, extra), value=pad_token_id)
    lab = F.pad(labels, (0, extra), value=IGNORE_INDEX)
    pos = torch.arange(s + extra, device=input_ids.device).expand(b, -1)
    return ids, lab, pos
