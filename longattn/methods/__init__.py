"""Attention methods: one file per method family, each a dataclass spec with an `attend` function."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .act import AttentionCalibration
from .base import AttendCall, AttentionMethod
from .block_topk import BlockTopK
from .dense import Dense
from .dgqa import DynamicGQA
from .dilated import Dilated
from .head_hybrid import HeadHybrid
from .kdgqa import KeyDistributedGQA
from .logn import LogNScaling
from .s2_attn import S2Attn
from .pgqa import PerturbedGQA
from .routing import Routing
from .sf_attn import SFAttn
from .sink_window import SinkWindow
from .ssa import SelectiveAttention
from .sliding_window import SlidingWindow
from .vertical_slash import VerticalSlash
from .yarn_temperature import YarnTemperature

# name -> spec class; a new method adds one line here.
METHODS: dict[str, type[AttentionMethod]] = {cls.name: cls for cls in (
    BlockTopK, Dense, Dilated, HeadHybrid, LogNScaling, Routing, S2Attn, SFAttn, SinkWindow, SlidingWindow,
    VerticalSlash, YarnTemperature,
    AttentionCalibration, DynamicGQA, KeyDistributedGQA, PerturbedGQA, SelectiveAttention)}


@dataclass
class MethodInfo:
    """What `longattn.methods()` reports for one method."""

    name: str
    summary: str
    paper: str
    params: dict[str, Any]  # parameter name -> default value


def method_infos() -> list[MethodInfo]:
    infos = []
    for name, cls in sorted(METHODS.items()):
        params = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                  for f in dataclasses.fields(cls) if f.init}
        infos.append(MethodInfo(name, cls.summary, cls.paper, params))
    return infos


def make_method(name: str, **params) -> AttentionMethod:
    """Build a validated spec from a method name and keyword parameters."""
    return build_spec(METHODS, "attention method", name, params)


def build_spec(registry: dict, kind: str, name: str, params: dict):
    """registry[name](**params), with errors naming the unknown `kind` or parameter and what is allowed."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; available: {sorted(registry)}")
    cls = registry[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {sorted(unknown)}; its parameters are {sorted(fields)}")
    return cls(**params)


__all__ = ["AttendCall", "AttentionCalibration", "DynamicGQA", "KeyDistributedGQA", "PerturbedGQA", "SelectiveAttention", "AttentionMethod", "BlockTopK", "Dense", "Dilated", "HeadHybrid", "LogNScaling", "METHODS", "MethodInfo", "Routing", "S2Attn", "SFAttn", "SinkWindow", "SlidingWindow", "VerticalSlash", "YarnTemperature",
           "make_method", "method_infos"]
