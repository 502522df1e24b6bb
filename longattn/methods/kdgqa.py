"""Key-Distributed GQA: query heads re-allocated to KV heads in every forward pass by the key-head norms."""
from __future__ import annotations

from dataclasses import dataclass

from ..kernels.dense import BACKENDS
from .base import AttendCall, AttentionMethod, check
from .key_driven_gqa import allocate, allocated_attention, head_to_kv, key_head_norms


@dataclass
class KeyDistributedGQA(AttentionMethod):
    """KDGQA (Khan et al. 2024, Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention,
    arXiv:2408.08454, §3): in each forward pass, KV head g receives a number of query heads proportional to
    its min-max normalized key norm ||K_g||_F (summed over the batch), rounded and repaired to total Hq; query
    heads are taken in order (contiguous blocks). It reads the grouped keys of the call (a model converted
    with `convert_to_gqa`, or native GQA); no MHA weights are needed.

    The allocation depends on every key of the call: a prefill uses the norms over the whole prompt (future
    keys included), a decode step those over the cache, so token-by-token decoding is not the same function
    as one prefill pass. With `per_sequence` each sequence gets its own allocation (batch-independent; not
    the paper's per-batch rule).

    Parameters
    ----------
    per_sequence : bool
        Allocate per sequence instead of once for the batch (the paper's rule).
    backend : str
        Dense kernel ("auto", "sdpa", "flex", "flash", "math").
    """

    name = "kdgqa"
    paper = "Khan et al. 2024, Key-Driven Grouped Query Attention (arXiv:2408.08454)"
    summary = "query heads allocated to KV heads by key-head norms in each forward pass"

    per_sequence: bool = False
    backend: str = "auto"

    def validate(self):
        check(self.name, "per_sequence", isinstance(self.per_sequence, bool), "True or False", self.per_sequence)
        check(self.name, "backend", self.backend in BACKENDS, f"one of {list(BACKENDS)}", self.backend)

    def allocation(self, key, mask, heads: int):
        """Query heads per KV head: [Hkv], or [B, Hkv] with per_sequence."""
        return allocate(key_head_norms(key, mask, self.per_sequence), heads, min_max=True)

    def attend(self, query, key, value, mask, call: AttendCall):
        kv_index = head_to_kv(self.allocation(key, mask, query.shape[1]))
        return allocated_attention(query, key, value, mask, kv_index, call, self.backend)
