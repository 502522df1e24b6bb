"""LongLoRA's shifted sparse attention (S2-Attn) for long-context fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.dense import dense_attention
from ..kernels.shifted_groups import shifted_group_attention
from .base import AttendCall, AttentionMethod, check, group_for_density


@dataclass
class S2Attn(AttentionMethod):
    """S2-Attn (Chen et al. 2023, LongLoRA, arXiv:2309.12307): the sequence is cut into groups of
    `group_size` (a quarter of the training length in the paper); half of the heads attend causally within
    the groups, the other half within groups shifted by half a group, so information flows between groups.

    As in the paper's code, the shift rolls the sequence: the last shifted group joins the sequence's last
    half group with its first, so in those heads the first tokens see the last ones (the leakage SinkLoRA's
    SF-Attn removes; see `sf_attn`). The pattern is for fine-tuning; LongLoRA attends fully at inference, and
    so do decoding steps here. The sequence length must be a multiple of `group_size`; heads must be even.

    Parameters
    ----------
    group_size : int
        Tokens per group (>= 2, even).
    density, density_length : float, int or None
        Instead of group_size: the smallest even group dividing `density_length` whose density over it
        reaches `density` ((group + 1) / (length + 1)).
    """

    name = "s2_attn"
    paper = "Chen et al. 2023, LongLoRA: Efficient Fine-tuning of Long-Context LLMs (arXiv:2309.12307)"
    summary = "LongLoRA shifted sparse attention: groups, half of the heads shifted by half a group (training)"

    group_size: int = 2048
    density: float | None = None
    density_length: int | None = None

    def validate(self):
        group_for_density(self, 2048, lambda g, mask: mask.causal_pair_count() * (g + 1) // (mask.q_len + 1))
        while self.density is not None and self.density_length % self.group_size:
            self.group_size += 2  # the sequence must split into whole groups
        check(self.name, "group_size", isinstance(self.group_size, int) and self.group_size >= 2
              and self.group_size % 2 == 0, "an even integer >= 2", self.group_size)

    def attend(self, query, key, value, mask, call: AttendCall):
        if call.dropout:
            raise ValueError(f"{self.name}: attention dropout is not supported")
        if call.softcap is not None:
            raise ValueError(f"{self.name}: logit soft-capping (Gemma2) is not supported")
        if query.shape[2] == 1:  # a decoding step: full attention, as LongLoRA uses at inference
            return dense_attention(query, key, value, mask, scale=call.scale)
        if query.shape[2] != key.shape[2] or mask.q_offset or mask.window is not None:
            raise ValueError(f"{self.name}: expects a full sequence without a cache (training) and a model "
                             "without its own sliding window")
        s = query.shape[2]
        g = self.group_size
        # Pairs per head: every group (rolled or not) is a causal G x G triangle.
        call.attended_pairs = (s // g) * g * (g + 1) // 2 if s % g == 0 else None
        return shifted_group_attention(query, key, value, g, scale=call.scale, padding=mask.key_padding())
