"""Per-head attention: chosen KV heads attend densely, the rest to sinks + a recent window (DuoAttention-style)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..kernels.dense import dense_attention
from .base import AttendCall, AttentionMethod, check
from .sink_window import SinkWindow


@dataclass
class HeadHybrid(AttentionMethod):
    """Full attention in retrieval heads, sinks + window elsewhere (Xiao et al. 2024, DuoAttention,
    arXiv:2410.10819; heads chosen by a profile as in Wu et al. 2024, arXiv:2404.15574).

    GQA at KV-head granularity: a KV head is full for all of its query heads. The pattern is the same in prefill
    and decoding; generate()'s cache keeps every entry of the full heads and only the sinks + window - 1 most
    recent entries of the others, held apart (longattn.kvcache.head_hybrid), so their memory is really bounded.

    Parameters
    ----------
    full_heads : dict or list or None
        The full KV heads: {layer: [kv heads]} or [[layer, kv head], ...]; layers left out have none.
    profile : str or None
        A head profile file (`longattn inspect` / `HeadProfile.save`) to choose them from instead.
    share : float
        With `profile`: the share of all KV heads made full, the highest `score` first.
    score : str
        With `profile`: which score ranks the heads ("retrieval" by default).
    select : str
        With `profile`: "top" (the best heads by `score`), "random" (as many heads, drawn with `seed`) or "layers"
        (whole layers, the best by mean `score`, the same share of layers): the baselines a choice is compared to.
    seed : int
        With select="random".
    sink_tokens, window : int
        The streaming heads' pattern (first real tokens + most recent positions, as `sink_window`).
    """

    name = "head_hybrid"
    paper = "Xiao et al. 2024, DuoAttention (arXiv:2410.10819); Wu et al. 2024, retrieval heads (arXiv:2404.15574)"
    summary = "chosen KV heads full, the others sinks + window (per-head hybrid)"
    per_layer = True
    learned_sinks = True

    full_heads: object = None
    profile: str | None = None
    share: float = 0.25
    score: str = "retrieval"
    select: str = "top"
    seed: int = 0
    sink_tokens: int = 4
    window: int = 256
    full: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self):
        check(self.name, "full_heads", (self.full_heads is None) != (self.profile is None),
              "given (or profile=, not both)", self.full_heads)
        check(self.name, "share", isinstance(self.share, (int, float)) and 0 < self.share <= 1, "in (0, 1]",
              self.share)
        check(self.name, "sink_tokens", isinstance(self.sink_tokens, int) and self.sink_tokens >= 0,
              "an integer >= 0", self.sink_tokens)
        check(self.name, "window", isinstance(self.window, int) and self.window >= 2, "an integer >= 2",
              self.window)
        check(self.name, "select", self.select in ("top", "random", "layers"), "one of top, random, layers",
              self.select)
        if self.profile is not None:
            from ..heads import HeadProfile

            prof = HeadProfile.load(self.profile)
            self.full = (prof.top_kv_heads(self.score, self.share) if self.select == "top" else
                         prof.random_kv_heads(self.share, self.seed) if self.select == "random" else
                         prof.top_layers(self.score, self.share))
        else:
            self.full = _full_heads(self.full_heads)
        self._streaming = SinkWindow(sink_tokens=self.sink_tokens, window=self.window, backend="auto")

    def heads_of(self, layer: int | None, n_kv: int) -> tuple[list[int], list[int]]:
        """(full KV heads, streaming KV heads) of a layer."""
        full = self.full.get(layer, [])
        bad = [h for h in full if h >= n_kv]
        if bad:
            raise ValueError(f"head_hybrid: layer {layer} has {n_kv} KV heads; full_heads names {bad}")
        return full, [h for h in range(n_kv) if h not in full]

    def attend(self, query, key, value, mask, call: AttendCall):
        n_kv = key.shape[1]
        g = query.shape[1] // n_kv
        full, streaming = self.heads_of(call.layer_idx, n_kv)
        # Pairs per sequence, averaged over KV heads: full heads attend every causal pair, the others sinks + window.
        call.attended_pairs = round((len(full) * mask.pair_count()
                                     + len(streaming) * self._streaming.computed_pairs(mask)) / n_kv)
        if not streaming:
            return dense_attention(query, key, value, mask, scale=call.scale, softcap=call.softcap,
                                   dropout=call.dropout, learned_sinks=call.learned_sinks)
        if not full:
            return self._streaming.attend(query, key, value, mask, call)
        out = torch.empty_like(query)
        for heads, run in ((full, "dense"), (streaming, "window")):
            kv = torch.tensor(heads, device=key.device)
            qh = (kv[:, None] * g + torch.arange(g, device=key.device)).reshape(-1)
            sinks = None if call.learned_sinks is None else call.learned_sinks[qh]
            sub = dataclasses.replace(call, learned_sinks=sinks)
            q, k, v = query[:, qh], key[:, kv], value[:, kv]
            if run == "dense":
                o = dense_attention(q, k, v, mask, scale=call.scale, softcap=call.softcap, dropout=call.dropout,
                                    learned_sinks=sinks)
            else:
                o = self._streaming.attend(q, k, v, mask, sub)
            out[:, qh] = o
        return out

    def install_cache(self, model):
        """generate()'s cache keeps every entry of the full heads and sinks + window of the others."""
        from ..kvcache.cache import install_cache_hook
        from ..kvcache.head_hybrid import HeadHybridStreaming

        return install_cache_hook(model, HeadHybridStreaming.for_method(self.full, self.sink_tokens, self.window))

    def position_pattern(self, first_token=None):
        raise ValueError("head_hybrid attends per head and cannot yet run over a compressed KV cache")


def _full_heads(spec) -> dict[int, list[int]]:
    """{layer: sorted KV heads} from {layer: [heads]} or [[layer, head], ...] (as JSON / TOML give them)."""
    pairs = []
    if isinstance(spec, dict):
        for layer, heads in spec.items():
            if not isinstance(heads, (list, tuple)):
                raise ValueError(f"head_hybrid: full_heads[{layer!r}] must be a list of KV heads, got {heads!r}")
            pairs += [(layer, h) for h in heads]
    elif isinstance(spec, (list, tuple)):
        for item in spec:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ValueError(f"head_hybrid: full_heads items must be [layer, kv_head], got {item!r}")
            pairs.append(tuple(item))
    else:
        raise ValueError(f"head_hybrid: full_heads must be {{layer: [kv heads]}} or [[layer, kv head], ...], "
                         f"got {spec!r}")
    full: dict[int, list[int]] = {}
    for layer, h in pairs:
        try:
            layer, h = int(layer), int(h)
        except (TypeError, ValueError):
            raise ValueError(f"head_hybrid: layer and head must be integers, got {layer!r}, {h!r}") from None
        if layer < 0 or h < 0:
            raise ValueError(f"head_hybrid: layer and head must be >= 0, got {layer}, {h}")
        full.setdefault(layer, [])
        if h not in full[layer]:
            full[layer].append(h)
    return {layer: sorted(heads) for layer, heads in sorted(full.items())}
