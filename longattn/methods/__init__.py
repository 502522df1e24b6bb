"""Attention methods: one file per method family, each a dataclass spec with an `attend` function."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
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
from .strided import Strided
from .vertical_slash import VerticalSlash
from .yarn_temperature import YarnTemperature


def _discover() -> dict[str, type[AttentionMethod]]:
    """name -> spec class, for every named AttentionMethod defined in a module of this package: a new method is
    its file, nothing more."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{module.name}")
        for cls in vars(mod).values():
            if isinstance(cls, type) and issubclass(cls, AttentionMethod) and cls.__module__ == mod.__name__ \
                    and cls.name:
                if cls.name in found:
                    raise RuntimeError(f"two attention methods are named {cls.name!r}: {found[cls.name]} and {cls}")
                found[cls.name] = cls
    return dict(sorted(found.items()))


METHODS: dict[str, type[AttentionMethod]] = _discover()


@dataclass
class MethodInfo:
    """What `longattn.methods()` reports for one method."""

    name: str
    summary: str
    paper: str
    params: dict[str, Any]  # parameter name -> default value
    model_edit: str = ""  # for a model edit, the call that adds its parameters to the model (then it is patched)


def method_infos() -> list[MethodInfo]:
    infos = []
    for name, cls in sorted(METHODS.items()):
        params = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                  for f in dataclasses.fields(cls) if f.init}
        infos.append(MethodInfo(name, cls.summary, cls.paper, params, cls.model_edit))
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


__all__ = ["AttendCall", "AttentionCalibration", "AttentionMethod", "BlockTopK", "Dense", "Dilated", "DynamicGQA",
           "HeadHybrid", "KeyDistributedGQA", "LogNScaling", "METHODS", "MethodInfo", "PerturbedGQA", "Routing",
           "S2Attn", "SFAttn", "SelectiveAttention", "SinkWindow", "SlidingWindow", "Strided", "VerticalSlash",
           "YarnTemperature", "make_method", "method_infos"]
