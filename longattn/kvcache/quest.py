"""Quest's page metadata kept in the KV cache: each key block's elementwise min and max, updated as tokens are
appended, so that a decoding step reads the metadata of every block and the keys of the blocks it selects,
not every key (Tang et al. 2024, Quest, arXiv:2406.10774).

`longattn.patch(model, "block_topk", ...)` puts these layers in the cache generate() makes (its full-attention
layers; others stay as they are); block_topk's attention takes the metadata from the layer whose `update` ran
just before it (handed off as kvcache.handoff describes), and computes it from the keys where there is none (a
cache the user made, a forward without one).
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .handoff import HANDOFF_ATTR, Handoff, copy_sharing, module_handoff


def take_block_bounds(module, key: torch.Tensor, block_size: int):
    """(lo, hi) [B, Hkv, n_blocks, D] of the layer that returned `key` to `module` from its update just now, when
    it keeps them for this block size; else None."""
    handoff = module_handoff(module)
    layer = None if handoff is None else handoff.layer
    if not isinstance(layer, BlockBoundsLayer):
        return None
    handoff.layer = None
    if layer.block_size != block_size or layer.keys is None or layer.keys.shape != key.shape:
        return None
    return layer.lo, layer.hi


class BlockBoundsLayer(DynamicLayer):
    """A DynamicLayer that also keeps, per block of `block_size` positions, the elementwise min and max of its
    keys; appending tokens recomputes only the blocks they fall in."""

    def __init__(self, block_size: int, handoff: Handoff):
        super().__init__()
        self.block_size, self.handoff = block_size, handoff
        self.lo = self.hi = None

    def __deepcopy__(self, memo):  # a copy (Dory's per-loop layers) hands off as its cache does
        return copy_sharing(self, memo, self.handoff)

    def update(self, key_states, value_states, *args, **kwargs):
        start = 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        bs = self.block_size
        first = start // bs  # the first block the new keys touch (it may hold older keys too)
        if self.lo is not None and first == self.lo.shape[2] - 1 and (keys.shape[-2] - 1) // bs == first:
            # All new keys fall in the last, partial block (a decoding step): widen its bounds in place.
            torch.minimum(self.lo[:, :, -1:], key_states.amin(dim=2, keepdim=True), out=self.lo[:, :, -1:])
            torch.maximum(self.hi[:, :, -1:], key_states.amax(dim=2, keepdim=True), out=self.hi[:, :, -1:])
            self.handoff.layer = self
            return keys, values
        n_blocks = math.ceil(keys.shape[-2] / bs)
        tail = keys[:, :, first * bs:]
        pad = (n_blocks - first) * bs - tail.shape[-2]
        if pad:  # the last block is partial: repeat a real key, so min / max cover only real keys
            tail = torch.cat([tail, tail[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
        blocks = tail.view(*tail.shape[:2], n_blocks - first, bs, tail.shape[-1])
        lo, hi = blocks.amin(dim=3), blocks.amax(dim=3)
        if self.lo is None or first == 0:
            self.lo, self.hi = lo, hi
        else:
            self.lo = torch.cat([self.lo[:, :, :first], lo], dim=2)
            self.hi = torch.cat([self.hi[:, :, :first], hi], dim=2)
        self.handoff.layer = self
        return keys, values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a cache with Quest block metadata cannot be cropped")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.lo is not None:
            self.lo, self.hi = (t.index_select(0, beam_idx.to(t.device)) for t in (self.lo, self.hi))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lo is not None:
            self.lo, self.hi = self.lo.repeat_interleave(repeats, 0), self.hi.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lo is not None:
            self.lo, self.hi = self.lo[indices], self.hi[indices]


def install_block_bounds_hook(model, block_size: int):
    """A forward pre-hook that gives the fresh DynamicCache generate() made (or none, with use_cache=True)
    BlockBoundsLayers in place of its plain full-attention layers. Returns the hook handle."""
    from .cache import is_fresh_cache

    def hook(module, args, kwargs):
        if module.training or not model._supports_default_dynamic_cache():
            return None
        name = "past_key_values" if "past_key_values" in kwargs and "cache" not in kwargs else "cache"
        cache = kwargs.get(name)
        if cache is None and kwargs.get("use_cache") is True:
            cache = kwargs[name] = DynamicCache(config=model.config)
        if is_fresh_cache(cache):
            handoff = Handoff()
            setattr(cache, HANDOFF_ATTR, handoff)  # attached to the attention modules by patch()'s hooks
            if cache.layers:
                cache.layers = [BlockBoundsLayer(block_size, handoff) if type(layer) is DynamicLayer else layer
                                for layer in cache.layers]
            else:  # built lazily: every layer it appends is a plain DynamicLayer
                cache.layer_class_to_replicate = lambda: BlockBoundsLayer(block_size, handoff)
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)
