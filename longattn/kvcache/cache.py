"""A transformers `Cache` whose layers evict entries by a policy, so `model.generate` runs unchanged.

Flow of one forward through one layer: `CompressedLayer.update` appends this forward's keys and values and
returns kept + new (as transformers' DynamicLayer does); the layer's attention (longattn's AttentionInterface
function) attends over them, then calls `after_attention` with this forward's queries; there the policy scores
every entry and the layer evicts down to its budget. Between forwards a layer therefore never holds more than
its budget. Until the first eviction the entries are exactly a DynamicLayer's, so attention takes the model's
usual path (identical logits); afterwards the kept entries are no longer a contiguous run of positions and
attention is computed over them with an explicit mask built from their stream indices.

Every entry carries its stream index (its index among all tokens fed so far, pads included) and a validity
bit (False for pads and for the empty slots of head-adaptive budgets): `kept_positions(layer)` exposes them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from transformers.cache_utils import (Cache, DummyLayer, DynamicCache, DynamicIndexedLayer, DynamicLayer,
                                      DynamicSlidingWindowLayer, LinearAttentionAndFullAttentionLayer,
                                      LinearAttentionAndSlidingWindowAttentionLayer, LinearAttentionLayer)

from ..kernels.dense import dense_attention, repeat_kv
from ..kernels.masks import AttentionMask, causal
from ..models import (is_shared, latent_kv_cache, own_sparse_layers, rope_in_cache, rotary_inv_freq,
                      shared_indexer_layers)
from .base import KVPolicy, ScoreInput, drop_invalid
from .handoff import HANDOFF_ATTR, Handoff, HookHandles, cache_handoff, copy_sharing, module_handoff

def take_pending(module) -> "CompressedLayer | None":
    """The compressed-cache layer waiting for `module`'s attention: the one whose `update` the module just called (a
    shared module, serving several layers, is the one whose layer updated)."""
    handoff = module_handoff(module)
    layer = None if handoff is None else handoff.layer
    if not isinstance(layer, CompressedLayer) or (
            not is_shared(module) and layer.layer_idx != getattr(module, "layer_idx", None)):
        return None
    handoff.layer = None
    return layer


def shared_entries(module, layer_idx: int) -> "Entries | None":
    """The entries layer `layer_idx` attended over in this forward, for layers that reuse its keys and values
    (Gemma 3n / Gemma 4 KV sharing): they see exactly what it saw, at the same stream positions."""
    handoff = module_handoff(module)
    return None if handoff is None else handoff.shared.get(layer_idx)


@dataclass
class Entries:
    """Which stream positions a layer's entries stand for, as one forward's attention sees them: [B, Hkv, N]
    stream indices and validity, the last n_new of which are this forward's tokens; `compressed` once they are no
    longer the plain prefix of the stream (attention must then mask by stream index, not by cache index)."""

    token_index: torch.Tensor
    valid: torch.Tensor
    n_new: int
    compressed: bool
    # [B] each sequence's first real token, once known: eviction may drop it from some heads or from all
    start: torch.Tensor | None = None

    def attend(self, query, keys, values, pattern, scale: float, softcap: float | None, sliding_window: int | None,
               learned_sinks: torch.Tensor | None = None, selected: torch.Tensor | None = None):
        """Attention of this forward's queries over `keys`/`values` (one per entry), by stream index: causal,
        valid entries only, restricted by the layer's positional `pattern` (a mask function over stream indices,
        or None for plain causal), by the model's own sliding window and by the entries its indexer `selected`
        ([B, Q, N] bool, DeepSeek Sparse Attention). Returns ([B, Hq, Q, D], allowed [B, Hq, Q, N]), allowed None
        when it is plain causal over every entry (then no mask is built: the kernel's own causal path runs)."""
        if (pattern is None or pattern is causal) and sliding_window is None and selected is None and \
                bool(self.valid.all()):
            # Kept entries precede this forward's tokens and all are stored in stream order, so causal by stream
            # index is bottom-right causal by entry index: the plain kernel, no S x N mask (a decode step sees all).
            mask = AttentionMask.causal(query.shape[2], keys.shape[2], batch_size=query.shape[0], device=query.device)
            return dense_attention(query, keys, values, mask, scale=scale, softcap=softcap,
                                   backend="sdpa" if softcap is None else "math", learned_sinks=learned_sinks), None
        q_tok = self.token_index[:, :1, -self.n_new:].unsqueeze(-1)  # [B, 1, Q, 1]
        k_tok = self.token_index.unsqueeze(2)  # [B, Hkv, 1, N]
        allowed = self.valid.unsqueeze(2) & (k_tok <= q_tok)
        if pattern is not None:
            b = torch.arange(query.shape[0], device=query.device).view(-1, 1, 1, 1)
            h = torch.arange(self.token_index.shape[1], device=query.device).view(1, -1, 1, 1)
            allowed = allowed & pattern(b, h, q_tok, k_tok)
        if sliding_window is not None:
            allowed = allowed & (q_tok - k_tok < sliding_window)
        if selected is not None:
            allowed = allowed & selected.unsqueeze(1)
        allowed = repeat_kv(allowed, query.shape[1] // allowed.shape[1])
        mask = AttentionMask.from_tensor(allowed)
        return dense_attention(query, keys, values, mask, scale=scale, softcap=softcap,
                               backend="sdpa" if softcap is None else "math", learned_sinks=learned_sinks), allowed

    def first_token(self) -> torch.Tensor:
        """[B] stream index of each sequence's first real (non-pad) token (where its sinks start)."""
        if self.start is not None:
            return self.start
        big = torch.iinfo(torch.long).max
        return torch.where(self.valid, self.token_index, big).flatten(1).amin(-1)


class CompressedLayer(DynamicLayer):
    """One attention layer's entries, evicted by `policy` after every forward (see the module docstring)."""

    is_croppable = False
    heads_share_entries = False  # whether all KV heads must keep the same entries (see after_attention)

    def __init__(self, policy: KVPolicy, layer_idx: int, n_layers: int, cache: "CompressedCache",
                 latent: bool = False):
        DynamicLayer.__init__(self)
        self.policy, self.layer_idx, self.n_layers, self.cache = policy, layer_idx, n_layers, cache
        # An MLA layer caches one shared latent and RoPE key per token; its attention sees them expanded to per-head
        # keys and values (`view`), which is what attention and scoring use, while eviction acts on the latents.
        self.latent = latent
        self.view: tuple[torch.Tensor, torch.Tensor] | None = None
        # A layer that reuses another layer's indexer top-k (GLM-5 / HY-V4 "shared" indexer layers) keeps exactly
        # the entries that layer kept, so that the indices keep naming the same tokens in both.
        self.leader: CompressedLayer | None = None
        self.last_eviction: tuple | None = None  # (stream length, entries before, idx, slot_valid), latest eviction
        self.tiled = False  # the model attends over its KV heads tiled (JetMoE), checked on the first forward
        self.cumulative_length = 0
        self.token_index = self.valid = None
        self.entry_state: dict[str, torch.Tensor] = {}
        self.state: dict = {}
        self.n_new = 0
        self.awaiting = False  # update ran, its attention (and eviction) has not
        self.compressed = False  # entries are no longer the plain prefix of the stream
        self.prompt_length: int | None = None
        self.sequence_start: torch.Tensor | None = None  # [B] first real tokens, recorded before any eviction

    def __deepcopy__(self, memo):  # its cache (hand-off, new tokens' validity) and policy are shared, not copied
        return copy_sharing(self, memo, self.cache, self.policy)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_zeros(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.token_index = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.awaiting:
            raise RuntimeError(
                f"longattn KV cache, layer {self.layer_idx}: the previous forward never reached longattn's "
                f"attention, so the {self.policy.name!r} policy could not evict. Patch the model first "
                f"(longattn.patch(model, {self.policy.name!r}, ...) or longattn.patch(model, method, kv_cache=...))")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q = key_states.shape[:3]
        tok = torch.arange(self.cumulative_length, self.cumulative_length + q, device=self.device)
        new_valid = self.cache.new_token_validity(b, q, self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.token_index = torch.cat([self.token_index, tok.expand(b, h, q)], dim=-1)
        self.valid = torch.cat([self.valid, new_valid[:, None, :].expand(b, h, q)], dim=-1)
        self.cumulative_length += q
        self.n_new = q
        self.awaiting = True
        cache_handoff(self.cache).layer = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The kept entries then the new ones; while nothing was evicted this is exactly DynamicLayer's answer.
        held = 0 if self.keys is None else self.keys.shape[-2]
        return held + query_length, self.cumulative_length - held

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (evicted entries are gone)")

    def reset(self) -> None:
        raise NotImplementedError("a compressed KV cache cannot be reset in place; make a new one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices])

    def _batch_apply(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.token_index, self.valid = fn(self.token_index), fn(self.valid)
        if self.sequence_start is not None:
            self.sequence_start = fn(self.sequence_start)
        self.entry_state = {k: fn(v) for k, v in self.entry_state.items()}

    # ---------------------------------------------------------------------------------- attention side
    def entries(self) -> Entries:
        return Entries(self.token_index, self.valid, self.n_new, self.compressed, self.sequence_start)

    def attend(self, query, pattern, scale: float, softcap: float | None, sliding_window: int | None,
               learned_sinks: torch.Tensor | None = None, selected: torch.Tensor | None = None):
        """Attention of this forward's queries over the kept + new entries (see Entries.attend)."""
        return self.entries().attend(query, *self.attended_entries(), pattern, scale, softcap, sliding_window,
                                     learned_sinks, selected)

    def receive(self, key: torch.Tensor, value: torch.Tensor, module) -> None:
        """Take the keys and values the attention function was given. They must be exactly the entries this
        layer holds, or, for an MLA layer, those entries expanded per head (one key and value per entry)."""
        self.view = None
        if key.shape == self.keys.shape and value.shape == self.values.shape:
            return
        if self.latent and key.shape[0] == self.keys.shape[0] and key.shape[2] == value.shape[2] == \
                self.keys.shape[2]:
            self.view = key, value
            return
        # JetMoE: KV heads repeated once per expert. Its code tiles on every forward, so the contents are compared
        # once; later forwards only need the shapes to agree.
        if (self.tiled and tiles(key, self.keys, compare=False) and tiles(value, self.values, compare=False)) or \
                (tiles(key, self.keys) and tiles(value, self.values)):
            self.tiled = True
            self.view = key, value
            return
        from ..patching import UnsupportedModelError

        raise UnsupportedModelError(
            f"longattn KV cache: {type(module).__name__} attends over keys of shape {tuple(key.shape)} but "
            f"caches entries of shape {tuple(self.keys.shape)} (it transforms its cache before attention); "
            f"longattn's KV policies cannot compress such a cache")

    def attended_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values attention runs over: the entries, or their per-head expansion (MLA)."""
        return (self.keys, self.values) if self.view is None else self.view

    def first_token(self) -> torch.Tensor:
        """[B] stream index of each sequence's first real (non-pad) token among the entries."""
        return self.entries().first_token()

    def after_attention(self, query: torch.Tensor, scale: float, softcap: float | None,
                        learned_sinks: torch.Tensor | None = None) -> None:
        """Score the entries with this forward's queries and evict down to the policy's target."""
        self.awaiting = False
        # Before eviction: what this forward attended over, for layers that reuse this one's keys and values.
        cache_handoff(self.cache).shared[self.layer_idx] = self.entries()
        first = self.prompt_length is None
        if first:
            self.prompt_length = self.cumulative_length
            self.sequence_start = self.entries().first_token()
        if self.leader is not None:
            self.view = None
            last = self.leader.last_eviction
            if last is not None and last[0] == self.cumulative_length:  # the leader evicted in this forward
                _, held, idx, slot_valid = last
                if held != self.keys.shape[-2]:
                    raise RuntimeError(f"longattn KV cache: layer {self.layer_idx} shares layer "
                                       f"{self.leader.layer_idx}'s indexer but holds other entries")
                self.evict(idx, slot_valid)
            return
        n = self.policy.held(self.keys.shape[-2], self.valid)
        keep = self.policy.target(n, self.prompt_length if first else None, self.layer_idx, self.n_layers)
        if keep is None and not self.policy.stateful:
            return
        keys, values = self.attended_entries()
        r = keys.shape[1] // self.keys.shape[1]  # view heads per cached head (MLA: all; JetMoE: tiled)
        token_index, valid = (self.token_index, self.valid) if r == 1 else \
            (self.token_index.repeat(1, r, 1), self.valid.repeat(1, r, 1))
        inp = ScoreInput(keys, values, token_index, valid, query, self.n_new, scale, softcap, self.layer_idx,
                         self.n_layers, first, self.entry_state, self.state, learned_sinks)
        pooled = self.view is not None or self.heads_share_entries
        self.view = None
        if keep is None:  # nothing to evict: a stateful policy only updates its memory
            self.policy.observe(inp)
            return
        scores = self.policy.score(inp)
        if pooled:
            # MLA: every head reads the same latent entries; JetMoE's heads read KV heads tiled in another order
            # than grouped-query attention's; an indexer keeps one key per entry for all heads. The heads' scores
            # are pooled into one (their mean; attention-based scores are sums over query heads per KV head, and a
            # mean ranks as the sum does), so all heads keep the same entries.
            scores = scores.mean(1, keepdim=True)
        valid = self.valid[:, :scores.shape[1]]  # (pooled: every head's entries are the same tokens)
        idx, slot_valid = self.policy.select(drop_invalid(scores, valid), keep)
        self.evict(idx, slot_valid)

    def evict(self, idx: torch.Tensor, slot_valid: torch.Tensor) -> None:
        """Keep entries `idx` [B, Hkv, M] (slots with slot_valid False become empty)."""
        held = self.keys.shape[-2]
        def take(t):
            ix = idx.expand(-1, t.shape[1], -1)  # per-head policy memory of an MLA layer spans every head
            return t.gather(2, ix) if t.dim() == 3 else t.gather(2, ix.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))

        kept_valid = take(self.valid) & slot_valid
        self.keys, self.values = take(self.keys), take(self.values)
        if self.policy.shifts_positions:
            # StreamingLLM measures distances in the cache, not in the text: a query must see each kept key as
            # far away as the number of kept tokens between them. RoPE scores depend only on position
            # differences, so instead of moving every key back by the evictions before it (and the queries with
            # them), each kept key moves forward by the real tokens evicted after it: the recent window stays
            # put, only the sinks turn, and queries keep their text positions.
            evicted = self.valid.clone()
            evicted.scatter_(2, idx, False)
            counts = evicted.long()
            after = counts.sum(-1, keepdim=True) - counts.cumsum(-1)
            rope = self.cache.rope_tensor  # "keys", or "values" for MLA (its cached RoPE key)
            setattr(self, rope, self.cache.rerotate(getattr(self, rope), after.gather(2, idx), self.layer_idx))
        self.token_index = take(self.token_index)
        self.valid = kept_valid
        self.entry_state.update({k: take(v) for k, v in self.entry_state.items()})
        self.evict_extra(idx)
        self.compressed = True
        self.last_eviction = (self.cumulative_length, held, idx, slot_valid)

    def positions(self) -> torch.Tensor:
        """[B, Hkv, M] stream indices of the entries held (-1 for empty slots / pads)."""
        return torch.where(self.valid, self.token_index, -1)

    def tensors(self) -> list[torch.Tensor]:
        """The key/value tensors this layer holds (what it costs in memory)."""
        return [self.keys, self.values]

    def evict_extra(self, idx: torch.Tensor) -> None:
        """Keep entries `idx` of whatever else a layer holds per entry (an indexer's keys)."""


def tiles(view: torch.Tensor, entries: torch.Tensor, compare: bool = True) -> bool:
    """Whether `view` [B, r*H, N, D] is `entries` [B, H, N, D] repeated r times along the heads (with compare
    False: whether its shape is that of such a view)."""
    b, h, n, d = entries.shape
    if view.dim() != 4 or view.shape[0] != b or view.shape[2:] != (n, d) or view.shape[1] % h or view.shape[1] == h:
        return False
    tiled = entries.unsqueeze(1).expand(b, view.shape[1] // h, h, n, d)
    return not compare or torch.equal(view.view(b, -1, h, n, d), tiled)


class CompressedIndexedLayer(CompressedLayer):
    """An MLA layer with a DeepSeek Sparse Attention indexer (DeepSeek-V3.2, ...): its indexer keys (one per
    entry, [B, N, D]) are evicted with the entries they index, so the indexer keeps choosing among kept entries."""

    heads_share_entries = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.indexer_keys: torch.Tensor | None = None
        self.indexer_position_ids = None  # transformers' field; the models this layer serves never set it

    def update_indexer(self, indexer_key_states: torch.Tensor) -> torch.Tensor:
        self.indexer_keys = indexer_key_states if self.indexer_keys is None else \
            torch.cat([self.indexer_keys, indexer_key_states], dim=1)
        return self.indexer_keys

    def evict_extra(self, idx: torch.Tensor) -> None:
        if self.indexer_keys is None:
            return
        ix = idx[:, 0]  # the same for every head (heads_share_entries)
        self.indexer_keys = self.indexer_keys.gather(1, ix.unsqueeze(-1).expand(-1, -1, self.indexer_keys.shape[-1]))

    def _batch_apply(self, fn) -> None:
        super()._batch_apply(fn)
        if self.indexer_keys is not None:
            self.indexer_keys = fn(self.indexer_keys)


class CompressedHybridLayer(LinearAttentionLayer, CompressedLayer):
    """A layer of a hybrid model that holds both linear-attention (conv / recurrent) state and softmax attention
    keys and values (Falcon-H1, Zaya): the attention entries are compressed, the linear-attention state is kept
    exactly as transformers' own layer keeps it."""

    is_croppable = False

    def __init__(self, policy: KVPolicy, layer_idx: int, n_layers: int, cache: "CompressedCache",
                 number_of_states: int, latent: bool = False):
        CompressedLayer.__init__(self, policy, layer_idx, n_layers, cache, latent=latent)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # As transformers' hybrid layers: `update` passes (keys, values); the conv / recurrent updates keywords.
        if len(args) == 2 and not kwargs:
            CompressedLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def reset(self) -> None:
        CompressedLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        CompressedLayer.reorder_cache(self, beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        CompressedLayer.crop(self, tokens_to_remove)


# transformers' cache layers holding attention entries -> the compressed layer that replaces each (any other cache
# layer of an attention layer is refused; SSM / conv / linear-attention-only layers are left alone).
_COMPRESSED = {DynamicLayer: CompressedLayer, DynamicSlidingWindowLayer: CompressedLayer,
               DynamicIndexedLayer: CompressedIndexedLayer,
               LinearAttentionAndFullAttentionLayer: CompressedHybridLayer,
               LinearAttentionAndSlidingWindowAttentionLayer: CompressedHybridLayer}


class CompressedCache(DynamicCache):
    """The model's own DynamicCache with each softmax-attention layer replaced by a `CompressedLayer` sharing one
    policy; SSM, convolution and linear-attention layers of hybrid models stay exactly as transformers made them.

    Pass it to `model.generate(..., cache=...)` on a patched model, or let `longattn.patch(model, policy, ...)`
    put one in place of the cache generate would have made.
    """

    def __new__(cls, policy: KVPolicy | None = None, model=None, base: Cache | None = None):
        # A model with a DynamicCache subclass of its own (MiniMax's keeps linear-attention state beside the
        # attention layers) gets a compressed cache of that class, so that its extra methods and state are there.
        # (copy / deepcopy call __new__ with no arguments: the class is already the right one.)
        own = None if model is None else own_cache_class(model)
        if cls is CompressedCache and own is not None:
            cls = _compressed_classes.setdefault(own, type(f"Compressed{own.__name__}", (CompressedCache, own), {}))
        return super().__new__(cls)

    def __init__(self, policy: KVPolicy, model, base: Cache | None = None):
        from ..models import attention_layer_indices, kv_source_layers, num_layers

        check_compressible(model)
        n_layers = num_layers(model)
        # Layers reusing another layer's keys and values (KV sharing) cache nothing of their own.
        attention_layers = set(attention_layer_indices(model)) - set(kv_source_layers(model))
        latent = latent_kv_cache(model)
        base = DynamicCache(config=model.config) if base is None else base
        layers = list(base.layers)
        if len(layers) < n_layers:  # a lazily built cache: its layers would all have been DynamicLayers
            layers += [DynamicLayer() for _ in range(n_layers - len(layers))]
        for i in sorted(attention_layers):
            kind = _COMPRESSED.get(type(layers[i]))
            if kind is CompressedLayer and policy.layer_class is not None:  # a policy with a layout of its own
                kind = policy.layer_class
            if kind is None:
                raise _unsupported(f"{type(model).__name__}: its cache layer {i} is a {type(layers[i]).__name__}; "
                                   f"longattn's KV policies replace only attention layers of these kinds: "
                                   f"{[k.__name__ for k in _COMPRESSED]}")
            extra = (layers[i].number_of_states,) if kind is CompressedHybridLayer else ()
            layers[i] = kind(policy, i, n_layers, self, *extra, latent=latent)
        self.policy = policy
        self._new_validity: torch.Tensor | None = None
        setattr(self, HANDOFF_ATTR, Handoff())
        self._rotary = {i: rotary_inv_freq(model, i) for i in attention_layers} if policy.shifts_positions else None
        self.rope_tensor, self._rope_interleaved = rope_in_cache(model)
        for i, leader in shared_indexer_layers(model).items():
            layers[i].leader = layers[leader]
        own = own_cache_class(model)
        if own is None:
            Cache.__init__(self, layers=layers)
            return
        # The model's own class keeps its own state and expects its layers to appear lazily, one per layer reached
        # (MiniMax counts them); they appear as the layers built above.
        own.__init__(self)
        self.layer_class_to_replicate = lambda: layers[len(self.layers)]

    # -------------------------------------------------------------------------- set by the model hook
    def set_new_validity(self, attention_mask, q: int) -> None:
        """Which of the coming forward's q new tokens are pads, read from the mask the model is given: a 2D
        padding mask, or masks already built (a tensor [B, 1, Q, K], longattn's lazy mask, or a dict of them by
        layer type, as generate passes hybrid models while decoding): a token is real iff it may attend to
        itself."""
        if isinstance(attention_mask, dict):
            attention_mask = next((m for m in attention_mask.values() if m is not None), None)
        if isinstance(attention_mask, AttentionMask):
            pad = attention_mask.query_padding()
            self._new_validity = None if pad is None else pad[:, -q:].bool()
        elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            self._new_validity = attention_mask[:, -q:].bool()
        elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            own = attention_mask[:, 0, -q:, -q:].diagonal(dim1=-2, dim2=-1)
            self._new_validity = own if own.dtype == torch.bool else own == 0
        else:
            self._new_validity = None

    def new_token_validity(self, b: int, q: int, device) -> torch.Tensor:
        v = self._new_validity
        if v is None or v.shape != (b, q):
            return torch.ones(b, q, dtype=torch.bool, device=device)
        return v.to(device)

    # ------------------------------------------------------------------------- StreamingLLM positions
    def rerotate(self, keys: torch.Tensor, delta: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Rotate RoPE keys [B, H, N, D] of layer `layer_idx` (in place) by `delta` [B, H, N] more positions with
        that layer's table; rotations compose, and only the keys with a nonzero delta are touched. The rotary
        dims come first, as two halves, or as adjacent pairs where the model rotates them so (DeepSeek-V2)."""
        moved = delta != 0
        if not bool(moved.any()):
            return keys
        inv_freq = self._rotary[layer_idx].to(keys.device)
        half = inv_freq.numel()
        k = keys[moved].float()  # [M, D]
        angle = delta[moved].unsqueeze(-1).float() * inv_freq  # [M, half]
        cos, sin = angle.cos(), angle.sin()
        if self._rope_interleaved:
            x1, x2 = k[:, 0:2 * half:2], k[:, 1:2 * half:2]
            pairs = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
            k = torch.cat([pairs, k[:, 2 * half:]], dim=-1)
        else:
            x1, x2 = k[:, :half], k[:, half:2 * half]
            k = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, k[:, 2 * half:]], dim=-1)
        keys[moved] = k.to(keys.dtype)
        return keys

    # -------------------------------------------------------------------------------- inspection
    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """[B, Hkv, M] stream indices of the entries layer `layer_idx` holds (-1 for empty slots / pads)."""
        return self.layers[layer_idx].positions()

    def untouched(self) -> bool:
        """No attention layer was ever written to (a model that ignored this cache)."""
        return all(layer.cumulative_length == 0 for layer in self.layers if isinstance(layer, CompressedLayer))

    def attention_entry_counts(self) -> list[int]:
        """Entries per KV head held by each compressed (attention) layer, in layer order."""
        return [layer.positions().shape[-1] for layer in self.layers
                if isinstance(layer, CompressedLayer) and layer.is_initialized]

    def nbytes(self) -> int:
        """Bytes of the key/value tensors held (what the cache costs in memory)."""
        return sum(self.nbytes_per_layer().values())

    def nbytes_per_layer(self) -> dict[int, int]:
        """{layer: bytes of the key/value tensors it holds} for the compressed (attention) layers."""
        return {i: sum(t.numel() * t.element_size() for t in layer.tensors()) for i, layer in enumerate(self.layers)
                if isinstance(layer, CompressedLayer) and layer.is_initialized}


def _unsupported(msg: str):
    from ..patching import UnsupportedModelError

    return UnsupportedModelError(msg)


_compressed_classes: dict[type, type] = {}


def own_cache_class(model) -> type | None:
    """The DynamicCache subclass a model builds for itself instead of transformers' DynamicCache (MiniMaxCache),
    defined in its modeling file; None for models that use DynamicCache."""
    if not hasattr(model, "_supports_default_dynamic_cache") or model._supports_default_dynamic_cache():
        return None
    module = sys.modules[type(model).__module__]
    found = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, DynamicCache)
             and v is not DynamicCache and v.__module__ == module.__name__]
    return found[0] if len(found) == 1 else None


def check_compressible(model) -> None:
    """Refuse, naming the reason, models whose KV cache the policies cannot compress."""
    cfg = model.config.get_text_config(decoder=True)
    name = type(model).__name__
    if hasattr(model, "_supports_default_dynamic_cache") and not model._supports_default_dynamic_cache() and \
            own_cache_class(model) is None:
        raise _unsupported(f"{name} keeps a cache class of its own, not transformers' DynamicCache, whose "
                           f"attention layers longattn's KV policies compress")
    own = own_sparse_layers(model)
    if own:
        raise _unsupported(f"{name}'s layers {sorted(own)} are {sorted(set(own.values()))}: their selection of keys "
                           f"works on runs of consecutive tokens and their positions (folded into the mask), which "
                           f"evicting entries would break; longattn's KV policies do not run on it")
    if getattr(cfg, "num_kv_shared_layers", 0) and getattr(cfg, "kv_sharing_modes", None) is None:
        raise _unsupported(f"{name} shares KV-cache entries between layers but does not say which layer reuses "
                           f"which (no kv_sharing_modes), so longattn's KV policies cannot keep them consistent")


def is_fresh_cache(cache) -> bool:
    """A DynamicCache generate() just made and nothing has been written to: safe to compress."""
    if type(cache) is not DynamicCache:
        return False
    return all(getattr(layer, "keys", None) is None or layer.keys.numel() == 0 for layer in cache.layers
               if isinstance(layer, DynamicLayer)) and not any(
        getattr(layer, "is_initialized", False) for layer in cache.layers
        if not isinstance(layer, (DynamicLayer, DummyLayer)))


def default_pattern(method, layer: "CompressedLayer | Entries"):
    """The positional pattern `method` has over kept entries in decoding (causal for layers it leaves alone)."""
    if method is None or getattr(layer, "patterns_own_heads", False):  # (head_hybrid's layer: per head group)
        return causal
    return method.position_pattern(layer.first_token())


def _uses_cache(model, kwargs) -> bool:
    """Whether a forward called without a cache builds one: use_cache as given, else the config's default."""
    use = kwargs.get("use_cache")
    if use is None:
        use = getattr(model.config.get_text_config(decoder=True), "use_cache", False)
    return bool(use)


def install_cache_hook(model, policy: KVPolicy):
    """A forward pre-hook on the model's decoder that swaps the empty cache generate() made (or none, with
    use_cache=True) for a CompressedCache, and tells a compressed cache which new tokens are pads. Returns the
    hook handle."""
    def hook(module, args, kwargs):
        if module.training:
            return None
        name = "past_key_values" if "past_key_values" in kwargs and "cache" not in kwargs else "cache"
        cache = kwargs.get(name)
        if is_fresh_cache(cache):
            cache = kwargs[name] = CompressedCache(policy, model, base=cache)
        elif cache is None and _uses_cache(model, kwargs):  # the model would build its own cache otherwise
            cache = kwargs[name] = CompressedCache(policy, model)
        if isinstance(cache, CompressedCache):
            x = kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            x = args[0] if x is None and args else x
            cache.set_new_validity(kwargs.get("attention_mask"), x.shape[1])
        return args, kwargs

    def check_output(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        given = kwargs.get("cache", kwargs.get("past_key_values"))
        if module.training:
            return None
        if isinstance(given, CompressedCache) and (given.untouched() or cache is not given):
            raise _unsupported(f"longattn KV policy {policy.name!r}: {type(model).__name__} did not write to the "
                               f"compressed cache it was given (it keeps its own cache inside its modules), so the "
                               f"budget would not hold; refusing")
        if isinstance(cache, Cache) and not isinstance(cache, CompressedCache):
            raise _unsupported(f"longattn KV policy {policy.name!r}: {type(model).__name__} ran with its own "
                               f"{type(cache).__name__} instead of longattn's compressed cache (it builds its cache "
                               f"inside its forward), so the budget would not hold; refusing")

    # On the model generate() calls, not its base model: some (OPT) never call their base model's forward.
    check_compressible(model)
    return HookHandles(model.register_forward_pre_hook(hook, with_kwargs=True),
                       model.register_forward_hook(check_output, with_kwargs=True))
