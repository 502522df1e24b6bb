"""The one place that talks to transformers' attention interface.

`patch` registers a single attention function ("longattn") with `AttentionInterface` and a matching mask
function with `AttentionMaskInterface`, then switches the model to it with `set_attn_implementation`. The
mask function does not build a tensor: it returns a lazy `HFMask` holding transformers' own mask recipe, so
each layer materializes only what its kernel needs (nothing, a block mask, or exactly the tensor that the
model's original implementation would have received). Layers a method does not cover run the model's
original attention function on that original mask, unchanged.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .kernels.masks import AttentionMask, full, selected_keys
from .kvcache.handoff import HANDOFF_ATTR, install_handoff_hooks
from .methods import METHODS, AttendCall, AttentionMethod, make_method
from .models import (HANDLED_KWARGS, INERT_KWARGS, attention_layer_indices, attention_modules, eager_function,
                     is_shared, kv_source_layers, num_layers, own_sparse_layers, passed_through_modules)
from .recipes import find_recipe, load_recipe, recipe_names

ATTN_NAME = "longattn"
_LAYER_ATTR = "_longattn_method"  # set on each patched attention module
_ORIG_ATTR = "_longattn_original"  # the model's original attention implementation name, on every module
_METER_ATTR = "_longattn_meter"  # the model's DensityMeter, on every module
_SP_ATTR = "_longattn_sp"  # a longattn.parallel SequenceParallel, on each patched module when attention is sharded
_KV_SOURCE_ATTR = "_longattn_kv_source"  # on a layer that reuses another's keys and values: that layer's index
_CONFIG_ORIG_ATTR = "_longattn_original_impl"  # on the patched model's configs: what HFMask materializes for it


class UnsupportedModelError(ValueError):
    """The model cannot be patched (not a decoder-only LM on transformers' attention interface)."""


@dataclass
class DensityMeter:
    """Counts attended vs causal query-key pairs per phase over every attention call of a patched model."""

    attended: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    causal: dict = field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def add(self, phase: str, attended: int, causal: int) -> None:
        self.attended[phase] += attended
        self.causal[phase] += causal

    def density(self, phase: str | None = None) -> float | None:
        phases = [phase] if phase else list(self.causal)
        causal = sum(self.causal[p] for p in phases)
        return None if causal == 0 else sum(self.attended[p] for p in phases) / causal

    def reset(self) -> None:
        for d in (self.attended, self.causal):
            for k in d:
                d[k] = 0


@dataclass
class PatchState:
    """What `unpatch` needs, kept on the model as `model._longattn`, plus the density meter."""

    original_impl: str
    method: AttentionMethod
    layers: tuple[int, ...]
    meter: DensityMeter = field(default_factory=DensityMeter)
    sequence_parallel: object = None  # a longattn.parallel.SequenceParallel when the sequence is sharded over ranks
    kv_policy: object = None  # a longattn.kvcache.KVPolicy when the KV cache is compressed
    kv_hook: object = None  # the forward pre-hook that puts the compressed cache in place
    method_hook: object = None  # the method's own cache preparation (Quest's block metadata), if any
    handoff_hook: object = None  # attaches the forward's cache hand-off to the attention modules (kvcache.handoff)

    def __repr__(self) -> str:  # what a REPL shows after patch(): the method, not the model's module tree
        kv = f", kv_cache={self.kv_policy!r}" if self.kv_policy is not None else ""
        return f"PatchState({self.method!r}, layers={list(self.layers)}{kv}, was={self.original_impl!r})"


class HFMask(AttentionMask):
    """An AttentionMask built from the arguments transformers passes to a mask interface function."""

    hf_kwargs: dict

    def for_implementation(self, impl: str):
        """The mask exactly as transformers' builder for `impl` ("sdpa", "eager", ...) would return it."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        key = ("impl", impl)
        if key not in self._cache:
            self._cache[key] = ALL_MASK_ATTENTION_FUNCTIONS[impl](**self.hf_kwargs)
        return self._cache[key]

    def as_model_expects(self) -> torch.Tensor:
        """The tensor the model's original implementation would have received (for models that read the mask
        themselves, e.g. DeepSeek-V3.2's indexer slicing it); built once, only when a model asks."""
        if "model_expects" not in self._cache:
            impl = getattr(self.hf_kwargs.get("config"), _CONFIG_ORIG_ATTR, None) or "sdpa"
            mask = self.for_implementation(impl)
            if mask is None:  # the original implementation would have relied on is_causal: materialize it
                from transformers.masking_utils import sdpa_mask

                mask = sdpa_mask(**{**self.hf_kwargs, "allow_is_causal_skip": False})
            self._cache["model_expects"] = mask
        return self._cache["model_expects"]

    def __getitem__(self, index):
        return self.as_model_expects()[index]

    @property
    def dtype(self):
        return self.as_model_expects().dtype

    @property
    def shape(self):
        return self.as_model_expects().shape

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def real(x):
            return x.as_model_expects() if isinstance(x, HFMask) else x

        return func(*tree_map(real, args), **tree_map(real, kwargs or {}))

    def __and__(self, other):
        return self.as_model_expects() & other

    __rand__ = __and__

    def __or__(self, other):
        return self.as_model_expects() | other

    __ror__ = __or__

    def __invert__(self):
        return ~self.as_model_expects()


def _mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, local_size=None, **kwargs) -> HFMask:
    from transformers.masking_utils import (and_masks, causal_mask_function, padding_mask_function,
                                            prepare_padding_mask, sdpa_mask)

    mask_function = causal_mask_function if mask_function is None else mask_function
    hf_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    fn = mask_function if padding is None else and_masks(mask_function, padding_mask_function(padding))
    mask = HFMask(
        batch_size=batch_size, q_len=q_length, kv_len=kv_length, fn=fn, q_offset=int(q_offset),
        kv_offset=int(kv_offset), padding=padding, window=local_size, is_causal=True,
        is_plain_causal=mask_function is causal_mask_function and padding is None,
        structured=mask_function is causal_mask_function, device=kwargs.get("device", "cpu"),
        dense_builder=lambda: sdpa_mask(**hf_kwargs),
    )
    mask.hf_kwargs = hf_kwargs
    return mask


def _original_function(module: nn.Module, impl: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        return eager_function(module)
    return ALL_ATTENTION_FUNCTIONS[impl]


def longattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                       sliding_window=None, softcap=None, **kwargs):
    """The function registered under AttentionInterface["longattn"]: one of four paths per call (a compressed KV
    cache, sequence parallelism, the model's own attention, a longattn method), metered in one place; a compressed
    KV cache then scores and evicts with this call's queries."""
    from .kvcache.cache import shared_entries, take_pending

    if not hasattr(module, _ORIG_ATTR):
        raise UnsupportedModelError(
            f"longattn: {type(module).__name__} called the attention interface but is not one of the attention "
            f"modules longattn found in this model (softmax self-attention with a layer_idx, or cross-attention); "
            f"refusing rather than guessing what it expects")
    method: AttentionMethod | None = getattr(module, _LAYER_ATTR, None)
    sp = getattr(module, _SP_ATTR, None)
    if method is not None or sp is not None:
        _check_kwargs(module, kwargs)
    cache_layer = take_pending(module)
    if cache_layer is not None:
        cache_layer.receive(key, value, module)
    source = getattr(module, _KV_SOURCE_ATTR, None)  # a layer attending over another layer's keys and values
    reused = shared_entries(module, source) if source is not None else None
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if (cache_layer is not None and cache_layer.compressed) or (reused is not None and reused.compressed):
        result, pairs = _compressed_cache_path(module, query, key, value, cache_layer, reused, scale, softcap,
                                               sliding_window, kwargs)
    elif sp is not None:
        result, pairs = _sequence_parallel_path(sp, query, key, value, attention_mask, scale, softcap, dropout,
                                                sliding_window, kwargs)
    elif method is None:
        result, pairs = _model_path(module, query, key, value, attention_mask, dropout, scaling, sliding_window,
                                    softcap, kwargs)
    else:
        result, pairs = _method_path(method, module, query, key, value, attention_mask, scale, softcap, dropout,
                                     kwargs)
    meter: DensityMeter | None = getattr(module, _METER_ATTR, None)
    if meter is not None and pairs is not None:
        meter.add(*pairs())
    if cache_layer is not None:
        cache_layer.after_attention(query, scale, softcap, kwargs.get("s_aux"))
    return result


def _check_kwargs(module, kwargs) -> None:
    """An attention keyword argument longattn does not know could change the result: refuse, naming it."""
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in INERT_KWARGS and k not in HANDLED_KWARGS)
    if unknown:
        raise UnsupportedModelError(
            f"longattn: {type(module).__name__} passes attention argument(s) {unknown} that longattn does not "
            f"implement; they may change the result, so the patched layer refuses to run")


# Each path returns (what the attention function returns, None or a function giving (phase, attended pairs, causal
# pairs) of this call for the density meter: computed only when the model is metered).

def _compressed_cache_path(module, query, key, value, cache_layer, reused, scale, softcap, sliding_window, kwargs):
    """Attention over the entries a compressed KV cache kept (this layer's, or those of the layer it reuses)."""
    from .kvcache.cache import default_pattern

    indices = kwargs.get("indices")  # DeepSeek Sparse Attention: its indexer's choice among the entries
    selected = None if indices is None else selected_keys(indices, key.shape[2])
    entries = cache_layer if cache_layer is not None else reused
    pattern = default_pattern(getattr(module, _LAYER_ATTR, None), entries)
    s_aux = kwargs.get("s_aux")
    if cache_layer is not None:
        out, allowed = cache_layer.attend(query, pattern, scale, softcap, sliding_window, s_aux, selected)
    else:
        out, allowed = reused.attend(query, key, value, pattern, scale, softcap, sliding_window, s_aux, selected)

    def pairs():
        q_tok = entries.token_index[0, 0, -query.shape[2]:]
        q, n = query.shape[2], key.shape[2]  # allowed None: bottom-right causal over all n entries
        attended = q * (n - q) + q * (q + 1) // 2 if allowed is None else int(allowed[0].sum()) // allowed.shape[1]
        return "prefill" if q > 1 else "decode", attended, int((q_tok + 1).sum())

    return (out.transpose(1, 2).contiguous(), None), pairs


def _sequence_parallel_path(sp, query, key, value, attention_mask, scale, softcap, dropout, sliding_window, kwargs):
    """The sequence is sharded over ranks: ring / Ulysses attention (longattn.parallel)."""
    from .parallel.hf import sequence_parallel_attention, sequence_parallel_pairs

    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("longattn: sequence-parallel attention does not implement learned "
                                    "attention sinks (s_aux) yet")
    if kwargs.get("indices") is not None:
        raise UnsupportedModelError("longattn: sequence-parallel attention does not implement an indexer's "
                                    "top-k key selection (DeepSeek Sparse Attention)")
    out = sequence_parallel_attention(sp, query, key, value, attention_mask, scale=scale, softcap=softcap,
                                      dropout=dropout, sliding_window=sliding_window,
                                      position_ids=kwargs.get("position_ids"))
    # pairs of the FULL sequence (the same on every rank), not of this rank's shard
    return ((out.transpose(1, 2).contiguous(), None),
            lambda: ("prefill", *sequence_parallel_pairs(sp, query.shape[2], sliding_window)))


def _model_path(module, query, key, value, attention_mask, dropout, scaling, sliding_window, softcap, kwargs):
    """A layer the method does not cover: the model's own attention, untouched (an indexer's choice of keys folded
    into its mask, as the model itself does for eager / SDPA: it passes `indices` only to kernels that take them,
    which longattn's name is not)."""
    impl = getattr(module, _ORIG_ATTR)
    indices = kwargs.pop("indices", None)
    mask, pairs = attention_mask, None
    if indices is not None:
        mask = attention_mask.as_model_expects() if isinstance(attention_mask, HFMask) else attention_mask
        if not isinstance(mask, torch.Tensor):
            raise UnsupportedModelError(f"longattn: {type(module).__name__} passed indexer indices without a mask")
        chosen = selected_keys(indices, key.shape[2]).unsqueeze(1)
        mask = mask & chosen if mask.dtype == torch.bool else mask.masked_fill(~chosen, torch.finfo(mask.dtype).min)
    elif isinstance(attention_mask, HFMask):
        phase = "prefill" if query.shape[2] > 1 else "decode"
        pairs = lambda: (phase, attention_mask.pair_count(), attention_mask.causal_pair_count())  # noqa: E731
        mask = attention_mask.for_implementation(impl)
    result = _original_function(module, impl)(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                              sliding_window=sliding_window, softcap=softcap, **kwargs)
    return result, pairs


def _method_path(method: AttentionMethod, module, query, key, value, attention_mask, scale, softcap, dropout,
                 kwargs):
    """The longattn method of this layer, over the model's mask (as an AttentionMask)."""
    if isinstance(attention_mask, AttentionMask):
        mask = attention_mask
        if mask.kv_len != key.shape[2] or mask.q_len != query.shape[2]:
            raise UnsupportedModelError(
                f"longattn: {type(module).__name__} attends {query.shape[2]} queries over {key.shape[2]} keys, but "
                f"its mask describes {mask.q_len} x {mask.kv_len} (the model adds keys of its own, e.g. compressed "
                f"tokens); refusing rather than misplacing the pattern")
    elif isinstance(attention_mask, torch.Tensor):
        mask = AttentionMask.from_tensor(attention_mask)
    elif getattr(module, "is_causal", True):
        mask = AttentionMask.causal(query.shape[2], key.shape[2], batch_size=query.shape[0], device=query.device)
    else:
        mask = AttentionMask(query.shape[0], query.shape[2], key.shape[2], full, is_causal=False,
                             device=query.device)
    indices = kwargs.get("indices")
    if indices is not None:  # the method restricts the model's own choice of keys, as it does its sliding window
        chosen = selected_keys(indices, key.shape[2])
        qo, ko = mask.q_offset, mask.kv_offset
        mask = mask.restrict(lambda b, h, q, k: chosen[b, q - qo, k - ko])
    s_aux = kwargs.get("s_aux")
    if s_aux is not None and not method.learned_sinks:
        raise UnsupportedModelError(
            f"longattn: {type(module).__name__} has learned attention sinks (s_aux), which {method.name!r} does "
            f"not implement; methods that do: {sorted(n for n, c in METHODS.items() if c.learned_sinks)}")
    call = AttendCall(scale=scale, softcap=softcap, dropout=dropout, layer_idx=getattr(module, "layer_idx", None),
                      module=module, learned_sinks=s_aux)
    out = method.attend(query, key, value, mask, call)
    phase = "prefill" if query.shape[2] > 1 else "decode"
    attended = call.attended_pairs  # set by methods whose pattern depends on the data
    return ((out.transpose(1, 2).contiguous(), None),
            lambda: (phase, attended if attended is not None else method.computed_pairs(mask),
                     mask.causal_pair_count()))


_registered = False


def _register() -> None:
    """Add longattn's names to transformers' interfaces (additive: nothing of transformers is replaced)."""
    global _registered
    if not _registered:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(ATTN_NAME, longattn_attention)
        AttentionMaskInterface.register(ATTN_NAME, _mask_interface)
        _registered = True


def _check_supported(model) -> list[nn.Module]:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"longattn.patch expects a transformers PreTrainedModel (e.g. from "
                        f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}")
    name = type(model).__name__
    why = None
    if getattr(model.config, "is_encoder_decoder", False):
        why = "it is an encoder-decoder model"
    elif not type(model)._can_set_attn_implementation():
        why = "its attention does not go through transformers' AttentionInterface"
    mods = attention_modules(model)
    if why is None and not mods:
        why = "no softmax self-attention layer on transformers' AttentionInterface was found"
    if why is None and any(m.layer_idx is None and not is_shared(m) for m in mods):
        why = "its attention modules do not know their layer index"
    own = [m.layer_idx for m in mods if not is_shared(m)]
    if why is None and len(set(own)) != len(own):
        why = ("several stacks of attention layers share layer indices (e.g. byte-level local and global "
               "transformers), so a layer index and a token position do not name one thing")
    if why is None and not all(getattr(m, "is_causal", False) is True for m in mods):
        why = ("its self-attention modules do not declare is_causal=True, so longattn cannot tell that they are "
               "causal (an encoder; a decoder built without is_decoder=True; BigBird-Pegasus's decoder, which SDPA "
               "then runs bidirectionally when no padding mask is given; Doge, which adds a learned mask of its own)")
    if why:
        raise UnsupportedModelError(
            f"longattn cannot patch {name}: {why}. Supported: causal LMs whose softmax self-attention goes "
            f"through transformers' AttentionInterface; every architecture of transformers is checked in "
            f"evals/results/compatibility.md")
    return mods


def _resolve_layers(layers, attention_layers: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    """Layer indices as the model counts them (decoder layers, attention or not) -> the attention layers chosen.
    A slice or index that selects no attention layer, or a layer that is not one, is an error."""
    where = (f"a model with {n_layers} layers" if len(attention_layers) == n_layers else
             f"a model with {n_layers} layers, of which {len(attention_layers)} are softmax attention "
             f"({', '.join(map(str, attention_layers))})")
    if layers is None or layers == "all":
        return attention_layers
    if isinstance(layers, str):  # Python slice syntax, e.g. "2:" = every layer but the first two
        parts = layers.split(":")
        if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() or not p.strip() for p in parts):
            raise ValueError(f"layers: expected 'all', a list of layer indices or a slice like '2:', got {layers!r}")
        bounds = [int(p) if p.strip() else None for p in parts]
        if any(b is not None and not -n_layers <= b <= n_layers for b in bounds[:2]):
            raise ValueError(f"layers: slice {layers!r} out of range for {where}")
        chosen = tuple(i for i in range(n_layers)[slice(*bounds)] if i in attention_layers)
        if not chosen:
            raise ValueError(f"layers: slice {layers!r} selects no attention layer of {where}")
        return chosen
    chosen = set()
    for i in [layers] if isinstance(layers, int) else layers:
        if not -n_layers <= int(i) < n_layers:
            raise ValueError(f"layers: index {i} out of range for {where} (0..{n_layers - 1})")
        if int(i) % n_layers not in attention_layers:
            raise ValueError(f"layers: layer {i} is not a softmax attention layer of {where}")
        chosen.add(int(i) % n_layers)
    return tuple(sorted(chosen))


def resolve_method(method, params: dict) -> tuple[AttentionMethod, object]:
    """(spec, layers from a recipe or None) from a name, spec object, recipe name or recipe path."""
    if isinstance(method, AttentionMethod):
        if params:
            raise ValueError("pass parameters either in the spec object or as keywords, not both")
        return method, None
    if isinstance(method, (str, Path)):
        if isinstance(method, str) and method in METHODS:
            return make_method(method, **params), None
        path = find_recipe(method)
        if path is not None:
            recipe = load_recipe(path)
            return make_method(recipe.method, **{**recipe.params, **params}), recipe.layers
        raise ValueError(f"unknown attention method or recipe {str(method)!r}; methods: {sorted(METHODS)}; "
                         f"recipes: {recipe_names()}")
    raise TypeError(f"method must be a name, an AttentionMethod spec or a recipe path, got {type(method).__name__}")


def resolve_kv_cache(method, kv_cache, params: dict):
    """(attention spec, layers, KV policy or None): a KV policy name as `method` means dense attention with
    that policy; `kv_cache` (a policy object, a name, or {"policy": name, **params}) composes one with `method`."""
    from .kvcache import POLICIES, make_policy

    if isinstance(method, str) and method in POLICIES:
        if kv_cache is not None:
            raise ValueError(f"{method!r} is a KV-cache policy; pass either it as the method or kv_cache=, not both")
        return make_method("dense"), None, make_policy(method, **params)
    spec, recipe_layers = resolve_method(method, params)
    if kv_cache is None:
        return spec, recipe_layers, None
    if isinstance(kv_cache, dict):
        kv_params = dict(kv_cache)
        if "policy" not in kv_params:
            raise ValueError(f"kv_cache: a dict needs a 'policy' key (one of {sorted(POLICIES)}), got {kv_cache!r}")
        policy = make_policy(kv_params.pop("policy"), **kv_params)
    else:
        policy = make_policy(kv_cache)
    spec.position_pattern(None)  # raises for methods that cannot attend over a compressed cache
    return spec, recipe_layers, policy


def patch(model, method="dense", *, layers=None, kv_cache=None, sequence_parallel=None, **params):
    """Make `model` attend with `method` (in place); returns its PatchState (also `patch_state(model)`: method,
    layers, density meter). A second patch replaces the first.

    `method` may also name a KV-cache policy ("h2o", "snapkv", ...; see longattn.kvcache), or `kv_cache=`
    adds one to an attention method: generate() then runs with a compressed cache.
    """
    mods = _check_supported(model)
    spec, recipe_layers, policy = resolve_kv_cache(method, kv_cache, params)
    attention_layers = attention_layer_indices(model)
    chosen = _resolve_layers(recipe_layers if layers is None else layers, attention_layers, num_layers(model))
    shared = any(is_shared(m) for m in mods)
    if shared and spec.per_layer:
        raise UnsupportedModelError(
            f"longattn: {type(model).__name__}'s attention modules are shared by several layers and do not know "
            f"which one calls them, and {spec.name!r} attends differently per layer")
    if shared and chosen != attention_layers:
        raise UnsupportedModelError(
            f"longattn: {type(model).__name__}'s attention modules are shared by its layers {list(attention_layers)}; "
            f"one module cannot attend two ways, so patch all of them (layers=None)")
    own = {i: t for i, t in own_sparse_layers(model).items() if i in chosen}
    if own and spec.name != "dense":
        raise UnsupportedModelError(
            f"longattn: {type(model).__name__}'s layers {sorted(own)} are {sorted(set(own.values()))}: they choose "
            f"their own keys, and {spec.name!r} cannot be composed with that exactly; leave them out with layers=")
    sp = None
    if sequence_parallel is not None:  # a SequenceParallel, ProcessGroup or group size (longattn.parallel)
        from .parallel.hf import sequence_parallel_for

        sp = sequence_parallel_for(sequence_parallel, spec, chosen == attention_layers)
    if policy is not None and chosen != attention_layers:
        raise ValueError("a compressed KV cache covers every layer: patch all layers (layers=None) with kv_cache")
    if getattr(model, "_longattn", None) is not None:
        unpatch(model)
    _register()
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise UnsupportedModelError(f"{type(model).__name__} refused set_attn_implementation({ATTN_NAME!r})")
    state = PatchState(original, spec, chosen, sequence_parallel=sp)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
        setattr(cfg, _CONFIG_ORIG_ATTR, original)
    for m in passed_through_modules(model):  # passed through to the model's own attention, unchanged
        setattr(m, _ORIG_ATTR, original)
    sources = kv_source_layers(model)
    for m in mods:
        setattr(m, _ORIG_ATTR, original)
        setattr(m, _METER_ATTR, state.meter)
        if m.layer_idx in sources:
            setattr(m, _KV_SOURCE_ATTR, sources[m.layer_idx])
        if m.layer_idx in chosen or is_shared(m):
            setattr(m, _LAYER_ATTR, spec)
            if sp is not None:
                setattr(m, _SP_ATTR, sp)
    if policy is not None:
        from .kvcache.cache import install_cache_hook

        state.kv_policy, state.kv_hook = policy, install_cache_hook(model, policy)
    else:
        state.method_hook = spec.install_cache(model)
    # After the hooks above, which may put a cache of their own in place: its hand-off reaches the modules.
    state.handoff_hook = install_handoff_hooks(model, mods)
    model._longattn = state
    return state


def unpatch(model) -> None:
    """Restore the model's original attention exactly; a model that is not patched is left as it is."""
    state: PatchState | None = getattr(model, "_longattn", None)
    if state is None:
        return
    model.set_attn_implementation(state.original_impl)
    for cfg in (model.config, model.config.get_text_config(decoder=True)):
        if hasattr(cfg, _CONFIG_ORIG_ATTR):
            delattr(cfg, _CONFIG_ORIG_ATTR)
    if state.kv_hook is not None:
        state.kv_hook.remove()
    if state.method_hook is not None:
        state.method_hook.remove()
    if state.handoff_hook is not None:
        state.handoff_hook.remove()
    for m in attention_modules(model) + passed_through_modules(model):
        for attr in (_LAYER_ATTR, _ORIG_ATTR, _METER_ATTR, _SP_ATTR, _KV_SOURCE_ATTR, HANDOFF_ATTR):
            if hasattr(m, attr):
                delattr(m, attr)
    del model._longattn


@contextlib.contextmanager
def patched(model, method="dense", *, layers=None, kv_cache=None, sequence_parallel=None, **params):
    """`with patched(model, "dense"): ...` patches for the block and always restores the original."""
    patch(model, method, layers=layers, kv_cache=kv_cache, sequence_parallel=sequence_parallel, **params)
    try:
        yield model
    finally:
        unpatch(model)


def patch_state(model) -> PatchState | None:
    return getattr(model, "_longattn", None)

