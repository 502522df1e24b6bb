"""SinkLoRA's SF-Attn: shifted sparse attention without wrap-around, plus global attention sinks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..kernels.gathered import LOCAL_BACKENDS, local_attention
from ..kernels.masks import AttentionMask, shifted_groups
from .base import AttendCall, AttentionMethod, check, group_for_density


@dataclass
class SFAttn(AttentionMethod):
    """SF-Attn (Zhang 2024, SinkLoRA, arXiv:2406.05678): like LongLoRA's S2-Attn, half of the heads attend
    within groups of `group_size` and half within groups shifted by half a group, but the shifted groups are
    reassembled instead of wrapped (the first shifted group is a half group), and every query also attends to
    the first `sink_tokens` tokens (global sinks).

    The pattern depends only on absolute positions, so it holds for any length and decoding token by token
    equals a prefill pass. Heads must be even (half are shifted).

    Parameters
    ----------
    group_size : int
        Tokens per group (>= 2, even).
    sink_tokens : int
        Initial tokens every query attends to (>= 0).
    backend : str
        "gathered" (keys within a group's reach only), a dense kernel with the mask, or "auto".
    density, density_length : float, int or None
        Instead of group_size: the smallest even group whose density (sinks included) over `density_length`
        tokens reaches `density`.
    """

    name = "sf_attn"
    paper = ("Zhang 2024, SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context LLMs "
             "(arXiv:2406.05678)")
    summary = "SinkLoRA shifted sparse attention: groups, half the heads shifted (no wrap), + global sinks"

    group_size: int = 2048
    sink_tokens: int = 4
    backend: str = "auto"
    density: float | None = None
    density_length: int | None = None

    def validate(self):
        group_for_density(self, 2048, lambda g, mask: dataclasses.replace(self, group_size=g, density=None,
                                                                          density_length=None).computed_pairs(mask))
        check(self.name, "group_size", isinstance(self.group_size, int) and self.group_size >= 2
              and self.group_size % 2 == 0, "an even integer >= 2", self.group_size)
        check(self.name, "sink_tokens", isinstance(self.sink_tokens, int) and self.sink_tokens >= 0,
              "an integer >= 0", self.sink_tokens)
        check(self.name, "backend", self.backend in LOCAL_BACKENDS and self.backend != "flash",
              "one of auto, gathered, sdpa, flex, math", self.backend)

    def computed_pairs(self, mask: AttentionMask) -> int:
        q = torch.arange(mask.q_len) + mask.q_offset
        total = 0
        for shift in (0, self.group_size // 2):  # half of the heads each
            start = torch.div(q + shift, self.group_size, rounding_mode="floor") * self.group_size - shift
            start = start.clamp_min(mask.kv_offset)
            in_group = q - start + 1
            sinks = (torch.clamp(start, max=self.sink_tokens) - mask.kv_offset).clamp_min(0)
            total += int((in_group + sinks).sum())
        return total // 2

    def attend(self, query, key, value, mask, call: AttendCall):
        hq, hkv = query.shape[1], key.shape[1]
        if hq % 2 or hkv % 2:
            raise ValueError(f"{self.name}: shifts half of the heads: needs an even number of query and "
                             f"key/value heads, got {hq} and {hkv}")
        first = mask.first_real_token()
        outs = []
        for half, shift in ((0, 0), (1, self.group_size // 2)):
            pattern = mask.restrict(shifted_groups(self.group_size, shift, self.sink_tokens, first),
                                    cache_key=(repr(self), shift))
            q = query[:, half * hq // 2:(half + 1) * hq // 2]
            k = key[:, half * hkv // 2:(half + 1) * hkv // 2]
            v = value[:, half * hkv // 2:(half + 1) * hkv // 2]
            outs.append(local_attention(q, k, v, pattern, span=self.group_size, sinks=self.sink_tokens,
                                        first_token=first, backend=self.backend, scale=call.scale,
                                        softcap=call.softcap, dropout=call.dropout))
        return torch.cat(outs, dim=1)
