"""The hand-off from a cache layer to the attention function that runs right after the layer's update.

transformers calls `cache.update(...)` in each attention module and then the attention function, without passing
it the cache. A cache that keeps more than keys and values (longattn's compressed cache, Quest's block bounds)
carries a `Handoff`: its layers leave themselves there in `update`, and a patched model's forward pre-hook
attaches the Handoff of the cache the forward was given to the model's patched attention modules, where the
attention function finds it. A forward hook, called also when the forward raises, detaches it again, so nothing
holds the cache after the forward.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

HANDOFF_ATTR = "_longattn_handoff"  # on a cache that hands off, and on attention modules during a forward


@dataclass
class Handoff:
    """One cache's hand-off, reset when a forward starts."""

    layer: Any = None  # the cache layer whose update ran last and whose attention has not run yet
    shared: dict = field(default_factory=dict)  # layer_idx -> the Entries it attended over (KV sharing)

    def reset(self) -> None:
        self.layer, self.shared = None, {}


def copy_sharing(layer, memo: dict, *shared):
    """deepcopy of a cache layer that keeps `shared` (what belongs to its cache: the hand-off, the cache itself) as
    they are, so that a layer copied alone (Dory's per-loop layers, appended to the cache they came from) stays
    part of that cache. When the whole cache is being copied, memo already maps those to their copies."""
    for obj in shared:
        memo.setdefault(id(obj), obj)
    new = object.__new__(type(layer))
    memo[id(layer)] = new
    new.__dict__.update(copy.deepcopy(layer.__dict__, memo))
    return new


def cache_handoff(cache) -> Handoff | None:
    return getattr(cache, HANDOFF_ATTR, None)


def module_handoff(module) -> Handoff | None:
    """The Handoff of the cache the current forward runs with, seen from one of its attention modules."""
    return getattr(module, HANDOFF_ATTR, None)


def install_handoff_hooks(model, modules) -> "HookHandles":
    """Hooks on `model` that attach the Handoff of the forward's cache (keyword `cache` or `past_key_values`, as
    generate passes it; after any hook registered before these has put its own cache in place) to `modules` and
    detach it when the forward ends."""
    modules = list(modules)

    def attach(_, args, kwargs):
        handoff = cache_handoff(kwargs.get("cache", kwargs.get("past_key_values")))
        if handoff is not None:
            handoff.reset()  # a forward that raised may have left a layer waiting
        for m in modules:
            setattr(m, HANDOFF_ATTR, handoff)
        return None

    def detach(*_):
        for m in modules:
            if hasattr(m, HANDOFF_ATTR):
                delattr(m, HANDOFF_ATTR)

    return HookHandles(model.register_forward_pre_hook(attach, with_kwargs=True),
                       model.register_forward_hook(detach, always_call=True))


class HookHandles:
    """Several hook handles, removed together."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
