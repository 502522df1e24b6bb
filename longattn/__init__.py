"""longattn: change how a Hugging Face causal LM attends over long contexts, and measure what it costs and buys.

    import longattn
    longattn.patch(model, "dense", backend="sdpa")     # a method name, a spec object or a recipe
    longattn.unpatch(model)                            # exactly the original attention again
    with longattn.patched(model, "dense"): ...
    longattn.methods()                                 # every method, its parameters and paper
    longattn.patch(model, "snapkv", kv_budget=512)     # a KV-cache policy: generate() keeps <= 512 per head
"""
from .gqa import convert_to_gqa, kv_cache_bytes_per_token
from .heads import HeadProfile, attention_map, profile_heads
from .kernels import AttentionMask, dense_attention
from .kvcache import POLICIES, CompressedCache, KVPolicy, make_policy
from .methods import METHODS, AttentionMethod, Dense, MethodInfo, method_infos
from .methods.act import act_select_heads
from .pretrained import KNOWN_MODELS, load_model
from .patching import UnsupportedModelError, patch, patch_state, patched, unpatch
from .recipes import load_recipe, recipe_names
from .reference import reference_model, reference_model_path
from .ssa import (add_selective_attention, load_selective, remove_selective_attention, save_selective,
                  selective_parameter_count)

__version__ = "0.1.0"


def methods() -> list[MethodInfo]:
    """Every attention method: name, one-line summary, paper reference and parameters with defaults; model edits
    (SSA) name the call that adds their parameters (`model_edit`). KV-cache policies: `POLICIES`."""
    return method_infos()


__all__ = [
    "AttentionMask", "AttentionMethod", "CompressedCache", "Dense", "KVPolicy", "POLICIES", "make_policy", "METHODS", "MethodInfo", "UnsupportedModelError", "act_select_heads",
    "add_selective_attention", "load_selective", "remove_selective_attention", "save_selective",
    "selective_parameter_count",
    "convert_to_gqa", "dense_attention", "kv_cache_bytes_per_token", "load_recipe", "methods", "patch", "patch_state", "patched", "recipe_names",
    "KNOWN_MODELS", "load_model", "reference_model", "reference_model_path", "unpatch",
    "HeadProfile", "attention_map", "profile_heads",
]
