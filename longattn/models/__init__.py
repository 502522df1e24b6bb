"""What longattn knows about transformers architectures, in one place.

Which modules are softmax self-attention on transformers' AttentionInterface and their true layer indices
(hybrid models interleave them with SSM / linear-attention / conv layers; shared or recurrent modules serve several
cache slots), which are passed through untouched (cross-attention, encoder towers), the eager function of a module,
the RoPE table of a layer and where a cache keeps the rotated key, the attention keyword arguments transformers
passes and what longattn does with each, latent (MLA) caches, indexers (DeepSeek Sparse Attention) and layers that
reuse another layer's keys, values or top-k. patching.py, kvcache/ and the GQA / SSA tools import this instead of
guessing on their own.
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import nn

# Keyword arguments an attention module passes to the attention function that never change the result of
# softmax attention over the given q, k, v and mask (bookkeeping for other kernels, or consumed by transformers).
INERT_KWARGS = frozenset({
    "position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "use_cache", "output_attentions", "past_key_values", "cache", "layer_idx", "is_causal", "position_embeddings",
    "token_type_ids", "kwargs", "return_dict", "head_mask", "output_hidden_states", "seq_idx", "target_dtype",
    "implementation", "output_router_logits",
})
# Keyword arguments longattn's attention function honours itself (see patching.longattn_attention).
HANDLED_KWARGS = frozenset({"dropout", "scaling", "sliding_window", "softcap", "s_aux", "indices"})


@functools.lru_cache(maxsize=None)
def calls_attention_interface(cls: type) -> bool:
    """Whether a module class dispatches to transformers' AttentionInterface (read from its source once)."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in src:
            return True
    return False


def is_passed_through(name: str, module: nn.Module) -> bool:
    """Attention that is not the decoder's causal self-attention, left untouched: cross-attention (to an encoder's
    states) in a decoder, and the bidirectional self-attention of an encoder tower inside a multimodal model (it
    knows no decoder layer: layer_idx None, is_causal False; Moss's audio encoder)."""
    leaf = name.rsplit(".", 1)[-1].lower()
    cross = bool(getattr(module, "is_cross_attention", False)) or "cross" in leaf or leaf == "encoder_attn" or \
        "cross" in type(module).__name__.lower()
    encoder = getattr(module, "layer_idx", 0) is None and getattr(module, "is_causal", None) is False
    return cross or encoder


def interface_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that calls the attention interface and knows its layer index."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "layer_idx") and calls_attention_interface(type(m))]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The softmax self-attention modules, ordered by their true layer index (hybrid models leave gaps)."""
    mods = [m for n, m in interface_modules(model) if not is_passed_through(n, m)]
    return sorted(mods, key=lambda m: (m.layer_idx is None, m.layer_idx or 0))


def is_shared(module: nn.Module) -> bool:
    """An attention module that serves several cache slots: shared by several decoder layers, which pass their own
    index with each call (the tied transformer blocks of Zamba, layer_idx None, and Zamba2, layer_idx -1), or run
    once per recurrent cycle, each cycle with its own slot (HRM's cycle_offset)."""
    params = _forward_parameters(type(module))
    return module.layer_idx == -1 or (module.layer_idx is None and "layer_idx" in params) or "cycle_offset" in params


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)  # (asked once per attention call: cached)


def attention_layer_indices(model: nn.Module) -> tuple[int, ...]:
    """The decoder layers whose softmax self-attention longattn patches, by the model's own index. Shared attention
    modules serve every layer that transformers' DynamicCache builds an attention cache layer for."""
    mods = attention_modules(model)
    own = {m.layer_idx for m in mods if not is_shared(m)}
    if len(own) < len(mods):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=model.config).layers
        own |= {i for i, layer in enumerate(layers) if isinstance(layer, DynamicLayer)}
    return tuple(sorted(own))


def passed_through_modules(model: nn.Module) -> list[nn.Module]:
    """Cross-attention and encoder-tower attention modules (see is_passed_through)."""
    return [m for n, m in interface_modules(model) if is_passed_through(n, m)]


def num_layers(model) -> int:
    """Decoder layers of the model (attention or not): what a layer index counts."""
    cfg = model.config.get_text_config(decoder=True)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "decoder_layers"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    mods = attention_modules(model)
    return 1 + max(m.layer_idx for m in mods) if mods else 0


def eager_function(module: nn.Module):
    """The eager attention function of the module's own modeling file (Gemma2's soft-caps, gpt-oss adds its
    learned sinks, ...)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def latent_kv_cache(model) -> bool:
    """Multi-head latent attention (DeepSeek-V2 and its descendants): the cache holds one shared latent per token
    (kv_lora_rank wide) and one shared RoPE key, which each forward expands into per-head keys and values."""
    return bool(getattr(model.config.get_text_config(decoder=True), "kv_lora_rank", None))


def rope_in_cache(model) -> tuple[str, bool]:
    """(which cached tensor carries the RoPE-rotated key, whether its rotary pairs are interleaved). Plain
    attention caches rotated keys ("keys", the first rotary dims, halves layout); MLA caches the rotated shared key
    as the layer's second tensor ("values"); DeepSeek-V2 rotates adjacent pairs as complex numbers."""
    if not latent_kv_cache(model):
        return "keys", False
    attn = attention_modules(model)
    return "values", bool(attn) and _source_mentions(type(attn[0]).__module__, "view_as_complex")


@functools.lru_cache(maxsize=None)
def _source_mentions(module_name: str, text: str) -> bool:
    """Whether a modeling file's source contains `text` (read once per file: caches are built per generate)."""
    return text in inspect.getsource(sys.modules[module_name])


def rotary_inv_freq(model, layer_idx: int) -> torch.Tensor:
    """The RoPE inverse frequencies layer `layer_idx` rotates its keys with. Models with one table per layer type
    (Gemma 3: local and global) keep `{layer_type}_inv_freq` buffers on one rotary module."""
    cfg = model.config.get_text_config(decoder=True)
    layer_types = getattr(cfg, "layer_types", None)
    layer_type = layer_types[layer_idx] if layer_types and layer_idx < len(layer_types) else None
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        if layer_type is not None and hasattr(module, f"{layer_type}_inv_freq"):
            return getattr(module, f"{layer_type}_inv_freq").detach().float().clone()
        if hasattr(module, "inv_freq"):
            return module.inv_freq.detach().float().clone()
    from ..patching import UnsupportedModelError

    raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding table longattn can read for "
                                f"layer {layer_idx}: shifting kept keys to cache positions needs RoPE; use "
                                f"shift_positions=False")


# Layer types whose attention already selects its own keys (indexer top-k, compressed tokens): only exact dense
# pass-through composes with them; another pattern on top would not be the method the user asked for.
OWN_SPARSE_LAYER_TYPES = ("indexed_attention", "heavily_compressed_attention", "compressed_sparse_attention")


def hands_over_selection(module: nn.Module) -> bool:
    """Whether the module passes its indexer's top-k keys to the attention function as `indices` (DeepSeek Sparse
    Attention) instead of folding them into the mask tensor: longattn then sees the model's own selection apart
    from its mask and composes a method with it exactly, as it does with the model's sliding window."""
    return _forward_mentions(type(module), "indices=")


@functools.lru_cache(maxsize=None)
def _forward_mentions(cls: type, text: str) -> bool:
    return text in inspect.getsource(cls.forward)


def own_sparse_layers(model) -> dict[int, str]:
    """{layer index: layer type} of the layers whose attention is sparse by the model's own design, in a way
    longattn cannot separate from their mask (see hands_over_selection)."""
    types = getattr(model.config.get_text_config(decoder=True), "layer_types", None) or []
    handed = {m.layer_idx for m in attention_modules(model) if hands_over_selection(m)}
    return {i: t for i, t in enumerate(types) if t in OWN_SPARSE_LAYER_TYPES and i not in handed}


def kv_source_layers(model) -> dict[int, int]:
    """{layer: the layer whose keys and values it reuses} (Gemma 3n / Gemma 4 KV sharing: a "reuse" layer attends
    over what the last "store" layer of its type cached)."""
    cfg = model.config.get_text_config(decoder=True)
    modes, types = getattr(cfg, "kv_sharing_modes", None) or [], getattr(cfg, "layer_types", None) or []
    sources = {}
    for i, mode in enumerate(modes):
        if mode == "reuse":
            stores = [j for j in range(i) if modes[j] == "store" and types[j] == types[i]]
            if not stores:
                from ..patching import UnsupportedModelError

                raise UnsupportedModelError(f"{type(model).__name__}: layer {i} reuses keys and values, but no "
                                            f"earlier {types[i]} layer stores them")
            sources[i] = stores[-1]
    return sources


def shared_indexer_layers(model) -> dict[int, int]:
    """{layer: the layer whose indexer top-k it reuses} (GLM-5, HY-V4 "shared" indexer layers: the choice of the
    last layer before them that runs its own indexer)."""
    types = getattr(model.config.get_text_config(decoder=True), "indexer_types", None) or []
    leaders, last = {}, None
    for i, t in enumerate(types):
        if t == "shared":
            if last is None:
                from ..patching import UnsupportedModelError

                raise UnsupportedModelError(f"{type(model).__name__}: layer {i} reuses an indexer top-k, but no "
                                            f"earlier layer computes one")
            leaders[i] = last
        else:
            last = i
    return leaders
