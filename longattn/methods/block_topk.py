"""Content-based block top-k attention (Quest): each query attends to the key blocks whose score upper
bound is highest, plus its own block."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..kernels.gathered import gathered_attention
from ..kernels.masks import AttentionMask
from .base import AttendCall, AttentionMethod, check

QUERY_TILE = 64  # queries per gathered tile (the union of their selected blocks is gathered once)
DEFAULT_TOP_K = 8
SELECT_CHUNK = 1024  # queries whose block selection is held at once (a multiple of QUERY_TILE)


def block_bounds(key: torch.Tensor, block_size: int, kv_offset: int = 0):
    """Per key block: the centre and half-range of the keys' elementwise min/max (Quest's page metadata).

    Blocks are aligned to absolute positions (block j holds positions j*block_size ...), so a block's
    metadata is the same whether the cache was filled by prefill or token by token. Returns centre, radius
    [B, Hkv, n_blocks, D] and the absolute index of the first block.
    """
    b, h, k_len, d = key.shape
    first_block = kv_offset // block_size
    lead = kv_offset - first_block * block_size  # positions of the first block that are not in this cache
    n_blocks = math.ceil((lead + k_len) / block_size)
    trail = n_blocks * block_size - lead - k_len
    # Missing positions are filled with a copy of a real key so that min/max cover only real keys.
    padded = torch.cat([key[:, :, :1].expand(b, h, lead, d), key, key[:, :, -1:].expand(b, h, trail, d)], dim=2)
    blocks = padded.view(b, h, n_blocks, block_size, d)
    lo, hi = blocks.amin(dim=3), blocks.amax(dim=3)
    return (hi + lo) / 2, (hi - lo) / 2, first_block


def quest_select(query: torch.Tensor, key: torch.Tensor, mask: AttentionMask, block_size: int,
                 top_k: int | None = None, density: float | None = None, bounds=None):
    """[B, Hq, Q, n_blocks] bool: the key blocks each query attends to.

    Upper bound of q.k over block j: sum_d max(q_d min_jd, q_d max_jd) = q.centre_j + |q|.radius_j (Tang et
    al. 2024). A query always keeps its own block and takes the top_k - 1 best earlier blocks; with `density`
    instead, a query whose block is the n-th keeps ceil(density * n) blocks (so every query, in prefill or in
    decode, keeps the same fraction of the blocks before it). `bounds` (lo, hi) are the blocks' min / max when
    the cache keeps them (keys starting at position 0), else they are computed from the keys.
    """
    b, hq, q_len, d = query.shape
    groups = hq // key.shape[1]
    if bounds is not None and mask.kv_offset == 0:
        centre, radius, first_block = (bounds[1] + bounds[0]) / 2, (bounds[1] - bounds[0]) / 2, 0
    else:
        centre, radius, first_block = block_bounds(key, block_size, mask.kv_offset)
    centre, radius = centre.repeat_interleave(groups, 1), radius.repeat_interleave(groups, 1)
    n_blocks = centre.shape[2]
    q = query.float()
    bound = (torch.matmul(q, centre.float().transpose(-1, -2))
             + torch.matmul(q.abs(), radius.float().transpose(-1, -2)))
    own = ((torch.arange(q_len, device=query.device) + mask.q_offset) // block_size - first_block).view(1, 1, -1, 1)
    blocks = torch.arange(n_blocks, device=query.device).view(1, 1, 1, -1)
    bound = bound.masked_fill(blocks >= own, float("-inf"))  # only earlier blocks compete
    if density is not None:
        k_per_query = torch.ceil(density * (own + first_block + 1).float()).long().clamp_min(1)
    else:
        k_per_query = torch.full_like(own, top_k)
    picks = min(int(k_per_query.max()) - 1, n_blocks)
    selected = blocks == own
    if picks > 0:
        best = bound.topk(picks, dim=-1)
        keep = torch.isfinite(best.values) & (torch.arange(picks, device=query.device) < k_per_query - 1)
        chosen = torch.zeros_like(selected.expand_as(bound)).scatter(-1, best.indices, keep)
        selected = selected | chosen
    return selected.expand(b, hq, q_len, n_blocks)


@dataclass
class BlockTopK(AttentionMethod):
    """Query-aware block-sparse attention (Tang et al. 2024, Quest, arXiv:2406.10774): keys are split into
    blocks; each query attends to its own block and the `top_k - 1` earlier blocks with the highest upper
    bound on its attention score, computed from each block's elementwise key min/max.

    Selection is made per query (Quest's decode-time rule applied to every query), so a prefill pass equals
    decoding token by token. Work and memory grow with queries x selected keys; blocks selected by several
    queries of a tile are gathered once.

    Parameters
    ----------
    block_size : int
        Keys per block (>= 1).
    top_k : int or None
        Blocks per query, its own included (>= 1; 8 when neither top_k nor density is given). A query with
        fewer blocks before it than top_k attends to all of them, as in Quest.
    density : float or None
        Instead of top_k: the fraction of the key blocks up to its own that each query keeps, in (0, 1].
    """

    name = "block_topk"
    paper = ("Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference "
             "(arXiv:2406.10774)")
    summary = "each query attends to its own block + the top_k - 1 blocks with the highest score bound"

    block_size: int = 64
    top_k: int | None = None
    density: float | None = None

    def validate(self):
        if self.top_k is None and self.density is None:
            self.top_k = DEFAULT_TOP_K
        check(self.name, "block_size", isinstance(self.block_size, int) and self.block_size >= 1,
              "an integer >= 1", self.block_size)
        if (self.top_k is None) == (self.density is None):
            raise ValueError(f"{self.name}: give exactly one of 'top_k' and 'density' "
                             f"(got top_k={self.top_k!r}, density={self.density!r})")
        if self.top_k is not None:
            check(self.name, "top_k", isinstance(self.top_k, int) and self.top_k >= 1, "an integer >= 1",
                  self.top_k)
        else:
            check(self.name, "density", isinstance(self.density, (int, float)) and 0 < self.density <= 1,
                  "in (0, 1]", self.density)

    def install_cache(self, model):
        from ..kvcache.quest import install_block_bounds_hook

        return install_block_bounds_hook(model, self.block_size)

    def attend(self, query, key, value, mask, call: AttendCall):
        if call.dropout:
            raise ValueError(f"{self.name}: attention dropout is not supported")
        from ..kvcache.quest import take_block_bounds

        # kept in the cache while decoding (Quest's pages)
        bounds = take_block_bounds(call.module, key, self.block_size)
        # Selection and its bounds cost queries x key blocks: make them a chunk of query tiles at a time.
        outs, pairs = [], 0
        for q0 in range(0, query.shape[2], SELECT_CHUNK):
            part = dataclasses.replace(mask, q_len=min(SELECT_CHUNK, query.shape[2] - q0),
                                       q_offset=mask.q_offset + q0, dense_builder=None, _cache={})
            out, n = self._attend_chunk(query[:, :, q0:q0 + SELECT_CHUNK], key, value, part, call, bounds)
            outs.append(out)
            pairs += n
        call.attended_pairs = pairs // (query.shape[0] * query.shape[1])
        return torch.cat(outs, dim=2)

    def _attend_chunk(self, query, key, value, mask, call: AttendCall, bounds=None):
        bs = self.block_size
        selected = quest_select(query, key, mask, bs, self.top_k, self.density, bounds)  # [B, Hq, Q, nb]
        b, hq, q_len, n_blocks = selected.shape
        hkv = key.shape[1]
        groups = hq // hkv
        first_block = mask.kv_offset // bs
        tile = min(QUERY_TILE, q_len)  # (a decoding step is one tile of one query, not a padded tile of 64)
        # Per tile of queries (and per sequence and KV head): the union of the blocks its queries selected.
        n_tiles = math.ceil(q_len / tile)
        pad = n_tiles * tile - q_len
        sel = torch.nn.functional.pad(selected, (0, 0, 0, pad)) if pad else selected
        sel = sel.view(b, hkv, groups, n_tiles, tile, n_blocks)
        union = sel.any(dim=4).any(dim=2)  # [B, Hkv, tiles, nb]
        width = int(union.sum(-1).max())
        picked = union.float().topk(width, dim=-1)  # selected blocks first
        block_ids = picked.indices
        offsets = torch.arange(bs, device=query.device)
        key_index = ((block_ids + first_block) * bs).unsqueeze(-1) + offsets - mask.kv_offset  # local indices
        real = (picked.values > 0).unsqueeze(-1) & (key_index >= 0) & (key_index < mask.kv_len)
        key_index = torch.where(real, key_index, torch.full_like(key_index, -1)).flatten(-2)
        key_block = block_ids.repeat_interleave(bs, dim=-1)  # [B, Hkv, tiles, width * bs]
        sel_by_tile = sel.permute(0, 1, 3, 2, 4, 5)  # [B, Hkv, tiles, G, T, nb]

        def selected_keys(c0, c, idx):  # does each query (and head) of these tiles select each gathered key?
            blk = key_block[:, :, c0:c0 + c].unsqueeze(3).unsqueeze(4)
            blk = blk.expand(b, hkv, c, groups, tile, blk.shape[-1])
            return sel_by_tile[:, :, c0:c0 + c].gather(-1, blk)

        # Attended pairs for the density meter: selected keys that the mask allows (summed over sequences, heads).
        q_pos = (torch.arange(q_len, device=query.device) + mask.q_offset).view(1, 1, -1, 1)
        starts = (torch.arange(n_blocks, device=query.device) + first_block) * bs
        lo = torch.clamp(starts, min=mask.kv_offset).view(1, 1, 1, -1)
        hi = torch.minimum(starts + bs - 1, q_pos)
        per_block = (hi - lo + 1).clamp_min(0)
        out = gathered_attention(query, key, value, mask, key_index, block_size=tile, scale=call.scale,
                                 softcap=call.softcap, tile_filter=selected_keys)
        return out, int((selected * per_block).sum())
