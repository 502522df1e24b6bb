"""KV-cache compression: eviction policies over a transformers Cache (one policy per file)."""
from __future__ import annotations

from ..methods import build_spec
from .adakv import AdaKV
from .base import KVPolicy, ScoreInput
from .cache import CompressedCache, CompressedLayer
from .h2o import H2O
from .knorm import KNorm
from .pyramidkv import PyramidKV
from .questions import ask, compress_context
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

# name -> spec class; a new policy adds one line here.
POLICIES: dict[str, type[KVPolicy]] = {cls.name: cls for cls in (
    AdaKV, H2O, KNorm, PyramidKV, SnapKV, StreamingLLM, TOVA)}


def make_policy(name, **params) -> KVPolicy:
    """A validated policy from a name (or a policy object, returned as is) and keyword parameters."""
    if isinstance(name, KVPolicy):
        if params:
            raise ValueError("pass parameters either in the policy object or as keywords, not both")
        return name
    return build_spec(POLICIES, "KV-cache policy", name, params)


__all__ = ["AdaKV", "CompressedCache", "CompressedLayer", "H2O", "KNorm", "KVPolicy", "POLICIES", "PyramidKV",
           "ScoreInput", "SnapKV", "StreamingLLM", "TOVA", "ask", "compress_context", "make_policy"]
