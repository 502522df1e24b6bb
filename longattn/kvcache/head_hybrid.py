"""The cache half of `head_hybrid`: full KV heads keep every entry, the others only their sinks + recent window
(DuoAttention, Xiao et al. 2024, arXiv:2410.10819). The two groups are held as separate tensors, so the streaming
heads' cache really is bounded (KV bytes = full heads x tokens + streaming heads x (sinks + window - 1))."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..kernels.masks import AttentionMask, causal, sinks_and_window
from .cache import CompressedLayer, Entries
from .streaming_llm import StreamingLLM


@dataclass
class HeadHybridStreaming(StreamingLLM):
    """StreamingLLM eviction (text positions) for the streaming heads of each layer; `full` {layer: [KV heads]}
    keep everything. Made by the head_hybrid method, not by name."""

    name: ClassVar[str] = "head_hybrid"
    layer_class: ClassVar[type] = None  # set below: HeadHybridLayer

    full: dict = field(default_factory=dict)
    pattern_window: int = 2

    @classmethod
    def for_method(cls, full: dict, sink_tokens: int, window: int) -> HeadHybridStreaming:
        # A query attends to the sinks and its window (itself included): window - 1 earlier tokens are enough.
        return cls(sink_tokens=sink_tokens, kv_budget=sink_tokens + window - 1, shift_positions=False, full=full,
                   pattern_window=window)


class HeadHybridLayer(CompressedLayer):
    """One layer: until its streaming heads first exceed their budget it is a plain CompressedLayer (all heads
    together, the method's own attention); then the full heads move to tensors of their own and the streaming
    heads' entries are evicted to sinks + window after every forward."""

    patterns_own_heads = True  # attends per head group with its own patterns (see default_pattern)

    def __init__(self, policy: HeadHybridStreaming, layer_idx: int, *args, **kwargs):
        super().__init__(policy, layer_idx, *args, **kwargs)
        self.full_heads: list[int] = list(policy.full.get(layer_idx, []))
        self.split = False
        self.full_keys = self.full_values = self.full_index = self.full_valid = None

    def _groups(self, n_kv: int) -> tuple[list[int], list[int]]:
        return self.full_heads, [h for h in range(n_kv) if h not in self.full_heads]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.split:
            return super().update(key_states, value_states, *args, **kwargs)
        full, streaming = self._groups(key_states.shape[1])
        b, _, q = key_states.shape[:3]
        tok = torch.arange(self.cumulative_length, self.cumulative_length + q, device=self.device)
        new_valid = self.cache.new_token_validity(b, q, self.device)
        self.full_keys = torch.cat([self.full_keys, key_states[:, full]], dim=-2)
        self.full_values = torch.cat([self.full_values, value_states[:, full]], dim=-2)
        self.full_index = torch.cat([self.full_index, tok.expand(b, len(full), q)], dim=-1)
        self.full_valid = torch.cat([self.full_valid, new_valid[:, None, :].expand(b, len(full), q)], dim=-1)
        super().update(key_states[:, streaming], value_states[:, streaming])
        return key_states, value_states  # passed on to the attention function, which attends over the groups

    def receive(self, key, value, module) -> None:
        if not self.split:
            super().receive(key, value, module)

    def attend(self, query, pattern, scale, softcap, sliding_window, learned_sinks=None, selected=None):
        if not self.split:
            return super().attend(query, pattern, scale, softcap, sliding_window, learned_sinks, selected)
        n_kv = len(self.full_heads) + self.keys.shape[1]
        g = query.shape[1] // n_kv
        full, streaming = self._groups(n_kv)
        stream = Entries(self.token_index, self.valid, self.n_new, True, self.sequence_start)
        groups = [(streaming, stream, self.keys, self.values,
                   sinks_and_window(self.policy.sink_tokens, self.policy.pattern_window, stream.first_token()))]
        if full:
            groups.append((full, Entries(self.full_index, self.full_valid, self.n_new, True), self.full_keys,
                           self.full_values, causal))
        width = max(e.token_index.shape[-1] for _, e, *_ in groups)
        b, q_len = query.shape[0], query.shape[2]
        out = query.new_empty(b, query.shape[1], q_len, self.values.shape[-1])
        allowed_all = torch.zeros(b, query.shape[1], q_len, width, dtype=torch.bool, device=query.device)
        for heads, entries, keys, values, pat in groups:
            qh = (torch.tensor(heads, device=query.device)[:, None] * g + torch.arange(g, device=query.device))
            qh = qh.reshape(-1)
            sinks = None if learned_sinks is None else learned_sinks[qh]
            o, allowed = entries.attend(query[:, qh], keys, values, pat, scale, softcap, sliding_window, sinks,
                                        selected)
            if allowed is None:  # plain causal over every entry
                n = keys.shape[-2]
                allowed = AttentionMask.causal(q_len, n, device=query.device).materialize()[:, :1].expand(
                    b, len(qh), q_len, n)
            out[:, qh] = o
            allowed_all[:, qh, :, :allowed.shape[-1]] = allowed
        return out, allowed_all

    def after_attention(self, query, scale, softcap, learned_sinks=None) -> None:
        n_kv = len(self.full_heads) + self.keys.shape[1] if self.split else self.keys.shape[1]
        full, streaming = self._groups(n_kv)
        if not streaming or (not self.split and self.keys.shape[-2] <= self.policy.kv_budget):
            self.awaiting = False
            if self.prompt_length is None:
                self.prompt_length = self.cumulative_length
            if not streaming and self.keys.shape[-2] > self.policy.kv_budget:
                # An all-full layer keeps everything, but the model's mask is now sized for the layers that
                # evicted: from here on it attends over its entries by stream index, as they do.
                self.compressed = True
            return
        g = query.shape[1] // n_kv
        if not self.split:  # the full heads leave the shared tensors; the streaming heads stay and get evicted
            self.full_keys, self.full_values = self.keys[:, full], self.values[:, full]
            self.full_index, self.full_valid = self.token_index[:, full], self.valid[:, full]
            self.keys, self.values = self.keys[:, streaming], self.values[:, streaming]
            self.token_index, self.valid = self.token_index[:, streaming], self.valid[:, streaming]
            self.split = True
        qh = (torch.tensor(streaming, device=query.device)[:, None] * g + torch.arange(g, device=query.device))
        sinks = None if learned_sinks is None else learned_sinks[qh.reshape(-1)]
        super().after_attention(query[:, qh.reshape(-1)], scale, softcap, sinks)

    def _batch_apply(self, fn) -> None:
        super()._batch_apply(fn)
        if self.split:
            self.full_keys, self.full_values = fn(self.full_keys), fn(self.full_values)
            self.full_index, self.full_valid = fn(self.full_index), fn(self.full_valid)

    def positions(self) -> torch.Tensor:
        if not self.split:
            return super().positions()
        n_kv = len(self.full_heads) + self.keys.shape[1]
        full, streaming = self._groups(n_kv)
        width = max(self.full_index.shape[-1], self.token_index.shape[-1])
        out = torch.full((self.keys.shape[0], n_kv, width), -1, dtype=torch.long, device=self.device)
        for heads, index, valid in ((full, self.full_index, self.full_valid),
                                    (streaming, self.token_index, self.valid)):
            if heads:
                out[:, heads, :index.shape[-1]] = torch.where(valid, index, -1)
        return out

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([self.full_keys, self.full_values] if self.split else [])


HeadHybridStreaming.layer_class = HeadHybridLayer
