"""The tiny base every attention method builds on: a validated dataclass spec plus one `attend` function."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels.masks import AttentionMask


@dataclass
class AttendCall:
    """Everything one attention call knows besides q, k, v and the mask (filled by the patching layer)."""

    scale: float
    softcap: float | None = None
    dropout: float = 0.0
    layer_idx: int | None = None
    module: Any = None
    # A method whose pattern depends on the data sets the pairs it attended (per sequence) here.
    attended_pairs: int | None = None
    # [Hq] learned sink logits (gpt-oss, ...): one more logit per head in the softmax denominator, value zero.
    learned_sinks: torch.Tensor | None = None


@dataclass
class AttentionMethod:
    """Base spec. Subclasses are dataclasses whose fields are the method's parameters.

    Class attributes: ``name`` (used by ``patch``), ``paper`` (one-line reference) and ``summary``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Whether attend() honours call.learned_sinks; others are refused on models that have them.
    learned_sinks: ClassVar[bool] = False
    # Whether attend() depends on call.layer_idx (per-layer heads, seeds, ...); refused on shared attention modules.
    per_layer: ClassVar[bool] = False
    # A model edit (new parameters on the model) names the call that adds them; without them its attention fails.
    model_edit: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the parameter and its allowed range; subclasses extend."""

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: AttentionMask,
               call: AttendCall) -> torch.Tensor:
        """query [B, Hq, Q, D], key/value [B, Hkv, K, D] (unexpanded GQA) -> output [B, Hq, Q, D]."""
        raise NotImplementedError

    def install_cache(self, model):
        """Prepare the cache generate() makes for this method (a hook handle with .remove(), or None)."""
        return None

    def computed_pairs(self, mask: AttentionMask) -> int:
        """Query-key pairs this method attends to in one call (per sequence): the density numerator."""
        return mask.pair_count()

    def position_pattern(self, first_token: torch.Tensor | None = None):
        """The method's pattern as a mask function over absolute positions, used to attend over a compressed
        KV cache (whose kept keys are no longer contiguous). `first_token` [B] is each sequence's first real
        token. Methods whose keys depend on the content, or on contiguous blocks, cannot run there."""
        raise ValueError(f"{self.name} cannot attend over a compressed KV cache (its keys are chosen from "
                         f"contiguous blocks or from their content); compose kv_cache with one of "
                         f"{kv_cache_methods()}")

    def block_pattern(self):
        """The pattern for sequence parallelism (longattn.parallel.patterns.BlockPattern), for methods that run
        sequence-parallel."""
        raise NotImplementedError(f"sequence_parallel runs the methods {sequence_parallel_methods()}; {self.name!r} "
                                  f"has no block pattern for it")

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


def group_for_density(method: AttentionMethod, default_group: int, pairs) -> None:
    """Shifted-group family: when `density` is given, set `group_size` to the smallest even group whose density
    over a causal sequence of `density_length` tokens reaches it; `pairs(group, mask)` counts attended pairs."""
    size_for_density(method, "group_size", default_group, pairs, step=2)


def sequence_parallel_methods() -> list[str]:
    """The registered methods that say how to run sequence-parallel (a block pattern)."""
    from . import METHODS

    return sorted(n for n, cls in METHODS.items() if cls.block_pattern is not AttentionMethod.block_pattern)


def kv_cache_methods() -> list[str]:
    """The registered methods that can attend over a compressed KV cache (they have a position pattern)."""
    from . import METHODS

    return sorted(n for n, cls in METHODS.items() if cls.position_pattern is not AttentionMethod.position_pattern)


def size_for_density(method: AttentionMethod, attr: str, default: int, pairs, step: int = 1, hint: str = "") -> None:
    """Set `method.<attr>` to the smallest multiple of `step` whose pairs (`pairs(size, causal mask)`, growing with
    the size) over `method.density_length` tokens reach `method.density` of the causal pairs; nothing when neither
    is given."""
    density, length = method.density, method.density_length
    if density is None and length is None:
        return
    check(method.name, "density", isinstance(density, (int, float)) and 0 < density <= 1, "a number in (0, 1]",
          density)
    check(method.name, "density_length", isinstance(length, int) and length >= step,
          f"an integer >= {step} (the sequence length at which the density is met)", length)
    if getattr(method, attr) != default:
        raise ValueError(f"{method.name}: give either {attr} or density (which sets the {attr}), not both")
    from ..kernels.masks import AttentionMask

    mask = AttentionMask.causal(length)
    target = density * mask.causal_pair_count()
    lo, hi = 1, -(-length // step)
    while lo < hi:  # pair counts grow with the size: bisect
        mid = (lo + hi) // 2
        if pairs(step * mid, mask) >= target:
            hi = mid
        else:
            lo = mid + 1
    reached = pairs(step * lo, mask) / mask.causal_pair_count()
    if reached < density:
        raise ValueError(f"{method.name}: density {density} cannot be reached over {length} tokens with these "
                         f"parameters (at most {reached:.3f}{hint})")
    setattr(method, attr, step * lo)


def check(method: str, param: str, ok: bool, allowed: str, value: Any) -> None:
    """One-line parameter validation with an error that says what is allowed."""
    if not ok:
        raise ValueError(f"{method}: parameter {param!r} must be {allowed}, got {value!r}")
