"""The small base every KV-cache eviction policy builds on: a validated dataclass spec that scores cached keys.

A policy never touches tensors it does not own: the cache layer (`cache.py`) hands it a `ScoreInput` with the
entries it holds (kept keys followed by the keys of the current forward) and the queries of that forward; the
policy returns one score per entry and head (higher = keep) and, optionally, per-layer budgets or a
head-adaptive selection. Attention probabilities, where a policy needs them, come from `attention_probs`,
which works a chunk of queries at a time so that a long prompt never holds a full S x S matrix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..kernels.dense import repeat_kv
from ..methods.base import check

# Query rows per chunk when a policy needs attention probabilities of many queries (H2O's prefill): the
# chunk holds ATTENTION_CHUNK x S scores, never S x S.
ATTENTION_CHUNK = 512


@dataclass
class ScoreInput:
    """What a policy may look at when the cache asks it to score its entries (one layer, one forward).

    keys/values [B, Hkv, N, D] are the kept entries followed by the `n_new` entries of this forward;
    token_index [B, Hkv, N] is each entry's index in the input stream (pads included); valid [B, Hkv, N] is
    False for pads and for empty slots. query [B, Hq, Q, D] are the queries of this forward (the last Q
    entries are theirs). `entry_state` holds the policy's per-entry memory ([B, Hkv, N'] tensors that the cache
    keeps aligned with the entries: gathered when it evicts; N' < N when the new entries are not yet scored);
    `state` is free per-layer memory.
    """

    keys: torch.Tensor
    values: torch.Tensor
    token_index: torch.Tensor
    valid: torch.Tensor
    query: torch.Tensor
    n_new: int
    scale: float
    softcap: float | None
    layer_idx: int
    n_layers: int
    prefill: bool
    entry_state: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    learned_sinks: torch.Tensor | None = None  # [Hq] the model's learned sink logits (gpt-oss), else None

    def query_tokens(self) -> torch.Tensor:
        """[B, 1, Q] stream indices of this forward's queries."""
        return self.token_index[:, :1, -self.n_new:]

    def attention_probs(self, q: torch.Tensor | None = None, q_tok: torch.Tensor | None = None,
                        reduce: str = "sum") -> torch.Tensor:
        """Softmax attention of queries `q` [B, Hq, R, D] at stream indices `q_tok` [B, 1, R] (default: this
        forward's) over all entries, causal by stream index, summed (or averaged) over the queries and over
        the query heads of each KV head: [B, Hkv, N]."""
        if q is None:
            q, q_tok = self.query, self.query_tokens()
        groups = q.shape[1] // self.keys.shape[1]
        keys = repeat_kv(self.keys, groups).float()
        key_tok = repeat_kv(self.token_index, groups)
        key_ok = repeat_kv(self.valid, groups)
        total = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        for start in range(0, q.shape[2], ATTENTION_CHUNK):
            qc = q[:, :, start:start + ATTENTION_CHUNK].float()
            scores = torch.matmul(qc, keys.transpose(-1, -2)) * self.scale
            if self.softcap is not None:
                scores = self.softcap * torch.tanh(scores / self.softcap)
            qt = q_tok[:, :, start:start + ATTENTION_CHUNK].unsqueeze(-1)  # [B, 1, c, 1]
            allowed = key_ok.unsqueeze(2) & (key_tok.unsqueeze(2) <= qt)
            scores = scores.masked_fill(~allowed, float("-inf"))
            if self.learned_sinks is not None:  # the sink logit takes its share of every query's softmax
                sink = self.learned_sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
                probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            total += probs.sum(2)
        total = total.view(total.shape[0], self.keys.shape[1], groups, -1).sum(2)
        if reduce == "mean":
            total = total / (q.shape[2] * groups)
        return total


@dataclass
class KVPolicy:
    """Base spec. Subclasses are dataclasses whose fields are the policy's parameters.

    kv_budget bounds what each layer keeps per KV head after every forward (prefill and each decoding step);
    compression_ratio evicts that fraction of the prompt once, after prefill (the kvpress convention). At least
    one of them must be given; with both, the prompt is cut to the smaller of the two and decoding stays within
    kv_budget. evict_every > 1 amortises decoding: a layer that would exceed its budget evicts down to
    budget - evict_every + 1, so the policy scores once every evict_every steps and the budget still holds.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Whether `score` must see every forward (it accumulates, like H2O), not only those that evict.
    stateful: ClassVar[bool] = False
    # A CompressedLayer subclass that holds this policy's entries in a layout of its own (head_hybrid), or None.
    layer_class: ClassVar[type | None] = None

    kv_budget: int | None = None
    compression_ratio: float | None = None
    evict_every: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check(self.name, "kv_budget", self.kv_budget is None or (isinstance(self.kv_budget, int)
                                                                and self.kv_budget >= 1),
              "None or an integer >= 1", self.kv_budget)
        check(self.name, "compression_ratio", self.compression_ratio is None or (
            isinstance(self.compression_ratio, (int, float)) and 0 < self.compression_ratio < 1),
            "None or a number in (0, 1)", self.compression_ratio)
        check(self.name, "evict_every", isinstance(self.evict_every, int) and self.evict_every >= 1 and (
            self.kv_budget is None or self.evict_every <= self.kv_budget), "an integer in [1, kv_budget]",
            self.evict_every)
        if self.kv_budget is None and self.compression_ratio is None:
            raise ValueError(f"{self.name}: give kv_budget (tokens kept per layer and KV head, bounded while "
                             f"decoding) and/or compression_ratio (fraction of the prompt evicted after prefill)")

    @property
    def shifts_positions(self) -> bool:
        """Whether kept keys move to cache positions when tokens before them are evicted (StreamingLLM)."""
        return False

    # ------------------------------------------------------------------------------------------ budgets
    def layer_share(self, keep: int, layer_idx: int, n_layers: int) -> int:
        """Entries this layer keeps when the average over layers is `keep` (uniform; PyramidKV overrides)."""
        return keep

    def held(self, width: int, valid: torch.Tensor) -> int:
        """Entries per KV head a layer holds, against which its budget is checked: the width of its tensors
        (head-adaptive policies, whose heads hold different numbers, override)."""
        return width

    def target(self, n_entries: int, n_prompt: int | None, layer_idx: int, n_layers: int) -> int | None:
        """How many entries (per KV head) the layer keeps after this forward; None = keep everything.

        n_prompt is the prompt length on the first forward (prefill), None afterwards.
        """
        limits = [] if self.kv_budget is None else [self.kv_budget]
        if n_prompt is not None and self.compression_ratio is not None:
            limits.append(max(1, math.ceil(n_prompt * (1 - self.compression_ratio))))
        if not limits:
            return None  # prompt-only compression: decoding appends freely
        keep = self.layer_share(min(limits), layer_idx, n_layers)
        if keep >= n_entries:
            return None
        return keep if n_prompt is not None else max(1, keep - self.evict_every + 1)

    # -------------------------------------------------------------------------------------- the policy
    def score(self, inp: ScoreInput) -> torch.Tensor:
        """[B, Hkv, N] importance of each entry (higher = keep); +inf = must keep, -inf = drop first."""
        raise NotImplementedError

    def observe(self, inp: ScoreInput) -> None:
        """Update the policy's memory with a forward after which nothing is evicted (only `stateful` policies
        are asked; scoring is left for the forwards that evict)."""

    def select(self, scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B, Hkv, M] into the entries, slot_valid [B, Hkv, M]): the `keep` best per head, in
        stream order; ties go to the older entry. Head-adaptive policies override (M may then exceed `keep` for
        some heads)."""
        idx = best(scores, keep).sort(dim=-1).values
        return idx, torch.ones_like(idx, dtype=torch.bool)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores along the last dim; equal scores keep their order (pooled votes tie
    often, and topk's order among ties is unspecified)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def protect_recent(scores: torch.Tensor, inp: ScoreInput, window: int) -> torch.Tensor:
    """Scores with the `window` most recent tokens (by stream index) forced to be kept."""
    if window <= 0:
        return scores
    newest = inp.token_index.amax(-1, keepdim=True)
    return scores.masked_fill(inp.token_index > newest - window, float("inf"))


def drop_invalid(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Pads and empty slots (valid False) go first (-inf), whatever the policy thinks of them."""
    return scores.masked_fill(~valid, float("-inf"))
