"""Attention masks described by index predicates, materialized only in the form a kernel needs.

A mask is a predicate ``allowed(batch_idx, head_idx, q_pos, kv_pos) -> bool`` over *absolute* positions (the
same convention as transformers' mask functions and FlexAttention's ``mask_mod``), plus the sizes and offsets
of the current call. Kernels ask for what they can use: a FlexAttention ``BlockMask`` (never S x S), a dense
boolean tensor (SDPA / the math kernel), or ``None`` when the pattern is plain causal and the kernel's own
``is_causal`` switch expresses it. This module knows nothing of Hugging Face models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b, h, q, k):
    return k <= q


def full(b, h, q, k):
    return q >= 0  # a tensor of True with the broadcast shape of q


def sliding_window(window: int) -> MaskFn:
    """Causal attention to the `window` most recent positions, the query's own included."""

    def allowed(b, h, q, k):
        return (k <= q) & (q - k < window)

    return allowed


def sinks_and_window(sink_tokens: int, window: int, first_token: torch.Tensor | None = None) -> MaskFn:
    """Causal attention to the first `sink_tokens` tokens of each sequence plus the `window` most recent.

    `first_token` ([batch] long) is where each sequence really starts (after left padding), so that the
    sinks are real tokens, not pads.
    """

    def allowed(b, h, q, k):
        start = 0 if first_token is None else first_token[b]
        return (k <= q) & ((q - k < window) | ((k >= start) & (k < start + sink_tokens)))

    return allowed


def dilated_window(window: int, dilation: int) -> MaskFn:
    """Causal attention to `window` keys spaced `dilation` apart, counting back from the query itself."""

    def allowed(b, h, q, k):
        d = q - k
        return (d >= 0) & (d % dilation == 0) & (d < window * dilation)

    return allowed


def shifted_groups(group_size: int, shift: int = 0, sink_tokens: int = 0,
            first_token: torch.Tensor | None = None) -> MaskFn:
    """Causal attention within groups of `group_size` positions, the groups starting at -shift (so with
    shift = group_size / 2 the first group holds only group_size / 2 positions), plus the first `sink_tokens`
    real tokens of each sequence for every query."""

    def allowed(b, h, q, k):
        start = 0 if first_token is None else first_token[b]
        same = torch.div(q - start + shift, group_size, rounding_mode="floor") == torch.div(
            k - start + shift, group_size, rounding_mode="floor")
        sink = (k >= start) & (k < start + sink_tokens)
        return (k <= q) & (same | sink)

    return allowed


def with_padding(fn: MaskFn, padding: torch.Tensor) -> MaskFn:
    """Restrict `fn` to key positions where `padding[b, kv_pos]` is True (absolute kv positions)."""

    def allowed(b, h, q, k):
        return fn(b, h, q, k) & padding[b, k]

    return allowed


def selected_keys(indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, Q, kv_len] bool: the keys an indexer chose for each query (`indices` [B, Q, top_k] of key indices, as
    DeepSeek Sparse Attention passes them)."""
    out = torch.zeros(*indices.shape[:2], kv_len, dtype=torch.bool, device=indices.device)
    return out.scatter_(-1, indices.long(), True)


@dataclass
class AttentionMask:
    """Which (query, key) pairs may interact in one attention call.

    ``q_len`` queries sit at absolute positions ``q_offset ...``; ``kv_len`` keys at ``kv_offset ...``.
    ``fn`` decides the pattern; ``padding`` ([batch, kv_offset + kv_len] bool, True = real token) is kept
    separately for kernels that take it directly (flash-attn's variable-length path). ``window`` (if not None)
    is the sliding window already contained in ``fn``; ``is_plain_causal`` says that ``fn`` is exactly
    bottom-right-aligned causal with no padding, so a kernel may use its built-in causal switch.
    """

    batch_size: int
    q_len: int
    kv_len: int
    fn: MaskFn = causal
    q_offset: int = 0
    kv_offset: int = 0
    padding: torch.Tensor | None = None
    window: int | None = None
    is_causal: bool = True
    is_plain_causal: bool = False
    # True when (is_causal, window, padding) describe the pattern completely (what flash-attn can express).
    structured: bool = False
    device: torch.device | str = "cpu"
    # Optional override producing the dense bool mask (or None for "plain causal"), e.g. transformers' own
    # builder so that dense attention through longattn sees exactly the tensor SDPA would have seen.
    dense_builder: Callable[[], torch.Tensor | None] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------------------------------- constructors
    @classmethod
    def causal(cls, q_len: int, kv_len: int | None = None, *, batch_size: int = 1, window: int | None = None,
               padding: torch.Tensor | None = None, device="cpu") -> "AttentionMask":
        """Bottom-right aligned causal mask (queries are the last `q_len` of `kv_len` positions)."""
        kv_len = q_len if kv_len is None else kv_len
        fn = causal if window is None else sliding_window(window)
        if padding is not None:
            fn = with_padding(fn, padding.to(device=device, dtype=torch.bool))
        return cls(batch_size, q_len, kv_len, fn, q_offset=kv_len - q_len, padding=padding, window=window,
                   is_plain_causal=window is None and padding is None, structured=True, device=device)

    @classmethod
    def from_tensor(cls, mask: torch.Tensor) -> "AttentionMask":
        """Wrap a user-supplied 4D mask (bool: True = attend, or additive float: 0 = attend)."""
        allowed = mask if mask.dtype == torch.bool else mask == 0
        b, _, q, k = allowed.shape

        def fn(bi, h, qi, ki):
            return allowed[bi if allowed.shape[0] > 1 else 0, 0, qi, ki]

        return cls(b, q, k, fn, is_causal=False, device=mask.device, dense_builder=lambda: allowed)

    def restrict(self, extra: MaskFn, window: int | None = None, cache_key=None) -> "AttentionMask":
        """A new mask allowing only the pairs both this mask and `extra` allow (absolute positions).

        `window` says that `extra` is a causal sliding window of that size, so that kernels with a native
        window (flash-attn) can still express the result. With a `cache_key` naming the pattern, the result
        is kept on this mask: every layer of a forward pass shares the mask, so whatever the restricted mask
        builds (a dense tensor, a block mask) is built once per pass, not once per layer.
        """
        if cache_key is not None and ("restrict", cache_key) in self._cache:
            return self._cache[("restrict", cache_key)]
        fn = self.fn

        def allowed(b, h, q, k):
            return fn(b, h, q, k) & extra(b, h, q, k)

        windows = [w for w in (self.window, window) if w is not None]
        restricted = AttentionMask(
            self.batch_size, self.q_len, self.kv_len, allowed, q_offset=self.q_offset, kv_offset=self.kv_offset,
            padding=self.padding, window=min(windows) if windows else None, is_causal=self.is_causal,
            structured=self.structured and (window is not None or extra is causal), device=self.device)
        if cache_key is not None:
            self._cache[("restrict", cache_key)] = restricted
        return restricted

    def first_real_token(self) -> torch.Tensor | None:
        """[B] absolute position of each row's first real (non-pad) token; None without padding."""
        return None if self.padding is None else self.padding.to(torch.int64).argmax(dim=-1)

    def pair_count(self, window: int | None = None, sink_tokens: int = 0, dilation: int = 1) -> int:
        """Causal (query, key) pairs per sequence (padding not subtracted) under this mask's own window,
        optionally restricted to `window` keys spaced `dilation` apart plus positions 0 .. `sink_tokens` - 1.

        O(q_len) arithmetic, no mask materialized: the numerator and denominator of attention density.
        """
        q = torch.arange(self.q_len, dtype=torch.long) + self.q_offset
        first = torch.full_like(q, self.kv_offset)
        if self.window is not None:
            first = torch.maximum(first, q - self.window + 1)
        last = torch.clamp(q, max=self.kv_offset + self.kv_len - 1)
        if window is None:
            return int((last - first + 1).clamp_min(0).sum())
        if dilation > 1:  # keys q, q - d, q - 2d, ... that are >= first, at most `window` of them
            steps = (q - first).div(dilation, rounding_mode="floor") + 1
            return int(torch.minimum(torch.full_like(q, window), steps).clamp_min(0).sum())
        lo = torch.maximum(first, q - window + 1)
        in_window = (last - lo + 1).clamp_min(0)
        sink_hi = torch.minimum(torch.minimum(last, lo - 1), torch.full_like(q, sink_tokens - 1))
        sinks = (sink_hi - first + 1).clamp_min(0)
        return int((in_window + sinks).sum())

    def evaluated_pair_count(self, extra: MaskFn, rows: int = 256) -> int:
        """Like `pair_count`, for any pattern: the causal pairs (within this mask's own window, padding not
        subtracted) that the predicate `extra` (absolute positions, batch row 0) allows, counted by evaluating
        it `rows` queries at a time."""
        k = (torch.arange(self.kv_len) + self.kv_offset).view(1, -1)
        zero = torch.zeros((), dtype=torch.long)
        total = 0
        for start in range(0, self.q_len, rows):
            q = (torch.arange(start, min(start + rows, self.q_len)) + self.q_offset).view(-1, 1)
            ok = (k <= q) & extra(zero, zero, q, k)
            if self.window is not None:
                ok &= q - k < self.window
            total += int(ok.sum())
        return total

    def causal_pair_count(self) -> int:
        """Pairs of full causal attention over the same positions: the denominator of attention density."""
        return AttentionMask(self.batch_size, self.q_len, self.kv_len, q_offset=self.q_offset,
                             kv_offset=self.kv_offset).pair_count()

    # -------------------------------------------------------------------------------------- materializers
    def local_fn(self) -> MaskFn:
        """The predicate over local indices (0..q_len, 0..kv_len), as FlexAttention's mask_mod expects."""
        fn, qo, ko = self.fn, self.q_offset, self.kv_offset
        if not qo and not ko:
            return fn

        def allowed(b, h, q, k):
            return fn(b, h, q + qo, k + ko)

        return allowed

    def dense(self) -> torch.Tensor | None:
        """[batch or 1, 1, q_len, kv_len] bool mask; None means plain causal (top-left == bottom-right here)."""
        if "dense" not in self._cache:
            if self.dense_builder is not None:
                self._cache["dense"] = self.dense_builder()
            elif self.is_plain_causal and (self.q_len == self.kv_len or self.q_len == 1):
                self._cache["dense"] = None
            else:
                self._cache["dense"] = self.materialize()
        return self._cache["dense"]

    def materialize(self) -> torch.Tensor:
        """Always a bool tensor [batch, 1, q_len, kv_len] (the slow, obvious form; references use it)."""
        dev = self.device
        b = torch.arange(self.batch_size, device=dev).view(-1, 1, 1, 1)
        h = torch.zeros(1, device=dev, dtype=torch.long).view(1, 1, 1, 1)
        q = (torch.arange(self.q_len, device=dev) + self.q_offset).view(1, 1, -1, 1)
        k = (torch.arange(self.kv_len, device=dev) + self.kv_offset).view(1, 1, 1, -1)
        return self.fn(b, h, q, k).expand(self.batch_size, 1, self.q_len, self.kv_len)

    def block_mask(self, block_size: int = 128):
        """A FlexAttention BlockMask built from the predicate (compiled; O(S^2 / block^2) memory)."""
        key = ("block", block_size)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            batch = self.batch_size if self.padding is not None or self.dense_builder is not None else None
            # create_block_mask(_compile=True) fails for a single query (decode) on CPU; that shape is tiny.
            self._cache[key] = create_block_mask(
                self.local_fn(), batch, None, self.q_len, self.kv_len, device=self.device,
                BLOCK_SIZE=block_size, _compile=self.q_len > 1,
            )
        return self._cache[key]

    def query_padding(self) -> torch.Tensor | None:
        """[batch, q_len] bool (True = real query token), when padding is known."""
        if self.padding is None:
            return None
        return self.padding[:, self.q_offset:self.q_offset + self.q_len]

    def key_padding(self) -> torch.Tensor | None:
        """[batch, kv_len] bool (True = real key token), when padding is known."""
        if self.padding is None:
            return None
        return self.padding[:, self.kv_offset:self.kv_offset + self.kv_len]
