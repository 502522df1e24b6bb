"""Tiny random configs for every causal-LM architecture of the installed transformers (tests and the
compatibility table): the architecture's default config with every size shrunk, and as few layers as keep one
of each layer type (attention, linear attention, SSM, sliding, full, ...) in the model's own order."""
from __future__ import annotations

import math

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 4, 2, 16, 128
MAX_LAYERS = 8
MAX_PARAMETERS = 5_000_000

# Sizes by config attribute name; applied only where the default config has the attribute (and it is not None).
SIZES = {
    "hidden_size": HIDDEN, "n_embd": HIDDEN, "d_model": HIDDEN, "embed_dim": HIDDEN, "embedding_dim": HIDDEN,
    "intermediate_size": 2 * HIDDEN, "ffn_dim": 2 * HIDDEN, "n_inner": 2 * HIDDEN, "ffn_hidden_size": 2 * HIDDEN,
    "decoder_ffn_dim": 2 * HIDDEN, "intermediate_size_mlp": 2 * HIDDEN, "d_ff": 2 * HIDDEN,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "decoder_attention_heads": HEADS, "encoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "num_kv_heads": KV_HEADS, "multi_query_group_num": KV_HEADS,
    "num_query_groups": KV_HEADS,
    "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "global_head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_k": 2, "top_k": 2, "n_group": 1, "topk_group": 1,
    "moe_intermediate_size": HIDDEN, "shared_expert_intermediate_size": HIDDEN, "shared_intermediate_size": HIDDEN,
    "moe_shared_expert_intermediate_size": HIDDEN, "expert_ffn_hidden_size": HIDDEN, "zero_expert_num": 2,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    # multi-head latent attention
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    # state-space / linear attention
    "mamba_d_state": 8, "ssm_state_size": 8, "state_size": 8, "mamba_n_heads": 8, "mamba_num_heads": 8,
    "n_mamba_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_headdim": 16, "mamba_n_groups": 1,
    "n_groups": 1, "mamba_ngroups": 1, "mamba_expand": 2, "expand": 2, "mamba_chunk_size": 16, "chunk_size": 16,
    "mamba_dt_rank": 8, "time_step_rank": 8, "mamba_d_ssm": 128,
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "lru_width": HIDDEN,
    "num_nextn_predict_layers": 0, "adapter_rank": 8,
    "rotary_dim": 8,  # partial rotary (codegen, gptj): must not exceed the head dim
    "d_head": HEAD_DIM, "n_shared_experts": 1, "num_shared_experts": 1, "num_expert_group": 1,
    "num_experts_per_token": 2,
    "adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN, "adapter_input_size": HIDDEN,  # vision / audio adapters
    "emb_dim": HIDDEN, "hidden_size_global": HIDDEN, "linear_head_dim": HEAD_DIM, "linear_num_heads": HEADS,
    "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS, "swa_head_dim": HEAD_DIM,
    "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    "encoder_hash_byte_group_vocab": VOCAB, "shape_vocab_size": VOCAB, "pronunciation_vocab_size": VOCAB,
    "shape_embed_dim": 16, "pronunciation_embed_dim": 16,
    "ext_pw_out_channel": HIDDEN, "depthwise_separable_out_channel": HIDDEN, "nemo_conv_channels": HIDDEN,
}
# Widths that keep their ratio to hidden_size (rwkv: equal, zamba: twice).
RELATIVE_TO_HIDDEN = ("attention_hidden_size",)
# Sizes the model needs even where the default config leaves them None ("derive it" / "not set").
FILL_NONE = ("head_dim", "num_key_value_heads", "num_experts_per_tok", "n_routed_experts", "n_group", "topk_group",
             "n_shared_experts")
# True per-architecture fixes, keyed by model_type (also of nested configs): set on the shrunk config dict just
# before the config is built (its validators run then); nested dicts merge into the default's.
OVERRIDES: dict[str, dict] = {
    # input / recurrent / output stacks must add up to the layers kept (to_dict counts attention + mlp blocks)
    "dory": {"n_input_layers": 2, "n_recurrent_layers": 4, "n_output_layers": 2},
    "mamba2": {"num_heads": 8},  # here num_heads are SSM heads: num_heads * head_dim == expand * hidden_size
    "zaya": {"num_experts_per_tok": 1},  # the config validator allows top-1 routing only
    # The defaults have no attention layer at all (pure Mamba), and transformers' cache cannot run a forward
    # without one; released checkpoints interleave attention, so the tiny model has one Mamba + one attention.
    "bamba": {"num_hidden_layers": 2, "attn_layer_indices": [1]},
    "granitemoehybrid": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
    # to_dict stores the inflated per-invocation layer count; reset the real per-stack count to 1 and let
    # __post_init__ re-inflate it (one cache slot per attention call of the recurrent forward)
    "hrm_text": {"num_hidden_layers": 1, "num_layers_per_stack": None},
    "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"]},  # default: None
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
    # DbrxAttention reads both (clamping with clip_qkv=None fails); released configs carry them
    "dbrx": {"attn_config": {"rope_theta": 5e5, "clip_qkv": 8.0}},
    # the default has indexed-attention layers but leaves the indexer (QSA) unsized
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                       "indexer_budget": 8, "indexer_compress_ratio": 4},
    # input_ids rows are (batch x codebooks): one codebook per row; generate starts each row with the decoder
    # start token, which the default leaves out of the shrunk vocabulary
    "musicgen_decoder": {"num_codebooks": 1, "decoder_start_token_id": 1},
    "musicgen_melody_decoder": {"num_codebooks": 1, "decoder_start_token_id": 1},
    "blt": {"use_cache": False},  # BltModel.forward builds DynamicCache(config=BltConfig), which has no layer count
    "xlstm": {"qk_dim_factor": 1.0},  # the config rounds qk_dim up to a multiple of 64, the model does not
    # the shared attention block is tied across its "hybrid" layers: keep two of them (layers 2 and 7)
    "zamba": {"num_hidden_layers": 8, "layers_block_type": None},
    "xmod": {"default_language": "en_XX"},  # forward needs a language adapter (the only default language)
    # the LM head needs a causal decoder; axial position embeddings must add up to hidden_size
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [HIDDEN // 4, 3 * HIDDEN // 4], "axial_pos_shape": [8, 8],
                 "local_attn_chunk_length": 8, "lsh_attn_chunk_length": 8},
}
# Generation settings a model's own generate() reads without a default (released checkpoints ship them in their
# generation_config.json), keyed by model_type.
GENERATION_OVERRIDES: dict[str, dict] = {
    "musicgen": {"num_return_sequences": 1},
    "musicgen_melody": {"num_return_sequences": 1},
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")  # the first one present counts layers
# Per-layer lists whose length is the number of layers; subsetting them keeps each layer's type.
INDEX_LISTS = ("moe_layers", "full_attn_idxs", "attn_layer_indices", "no_rope_layers_idx")


def _layer_subset(types: list[tuple]) -> list[int]:
    """Indices of the shortest prefix holding every distinct layer description (at most MAX_LAYERS), or else
    the first layer of each description."""
    distinct = list(dict.fromkeys(types))
    seen = set()
    for i, t in enumerate(types):
        seen.add(t)
        if len(seen) == len(distinct):
            if i + 1 <= MAX_LAYERS:
                return list(range(max(i + 1, 2 if len(types) >= 2 else 1)))
            break
    first = sorted({types.index(t) for t in distinct})
    return first if len(first) >= 2 or len(types) < 2 else first + [first[-1] + 1]


def shrink(config, seed_layers: int | None = None):
    """A tiny copy of `config` (see the module docstring). Returns a new config object."""
    d = config.to_dict()
    original = dict(d)
    for key, value in SIZES.items():
        if key in d and (isinstance(d[key], int) and not isinstance(d[key], bool)
                         or d[key] is None and key in FILL_NONE):
            d[key] = value
    for key in RELATIVE_TO_HIDDEN:
        if isinstance(d.get(key), int) and isinstance(original.get("hidden_size"), int):
            d[key] = HIDDEN * original[key] // original["hidden_size"]
    # multi-head latent attention: where head_dim is the rotary part of the query/key heads, it stays so
    if "qk_rope_head_dim" in d and original.get("head_dim") in (None, original["qk_rope_head_dim"]):
        d["head_dim"] = d["qk_rope_head_dim"]
    _mla_heads(d, original)
    n = next((d[k] for k in LAYER_COUNTS if k in d), None)
    if isinstance(n, int) and n > 0:
        per_layer = [k for k, v in d.items() if isinstance(v, list) and len(v) == n and k not in INDEX_LISTS]
        index_lists = [k for k in INDEX_LISTS if isinstance(d.get(k), list)]
        types = [tuple(_hashable(d[k][i]) for k in per_layer) +
                 tuple(i in d[k] for k in index_lists) for i in range(n)]
        for period, offset in (("attn_layer_period", "attn_layer_offset"), ("expert_layer_period", "expert_layer_offset")):
            if isinstance(d.get(period), int):
                types = [t + ((i % d[period]) == d[offset],) for i, t in enumerate(types)]
        shared = d.get("num_kv_shared_layers")  # the last layers reuse the key/value cache of earlier ones
        if isinstance(shared, int) and 0 < shared < n:
            types = [t + (i >= n - shared,) for i, t in enumerate(types)]
        for k in ("block_types",):  # a repeating pattern, not one entry per layer
            if isinstance(d.get(k), list) and k not in per_layer:
                types = [t + (d[k][i % len(d[k])],) for i, t in enumerate(types)]
        keep = _layer_subset(types) if seed_layers is None else list(range(seed_layers))
        layers = getattr(config, "num_hidden_layers", None)
        unit = n // layers if isinstance(layers, int) and 0 < layers < n and n % layers == 0 else 1
        if unit > 1:  # to_dict lists several blocks per layer (dory: attention, mlp): keep whole layers
            keep = sorted({i - i % unit + j for i in keep for j in range(unit)})
        for k in per_layer:
            d[k] = [d[k][i] for i in keep]
        for k in index_lists:
            d[k] = [keep.index(i) for i in d[k] if i in keep]
        if isinstance(d.get("per_layer_config"), dict):  # per-layer overrides keyed by layer index
            d["per_layer_config"] = {keep.index(int(i)): _shrink_flat(v) for i, v in d["per_layer_config"].items()
                                     if int(i) in keep}
        if isinstance(shared, int) and 0 < shared <= n:
            d["num_kv_shared_layers"] = sum(i >= n - shared for i in keep)
        for k in LAYER_COUNTS + ("num_blocks",):
            if k in d and isinstance(d[k], int) and d[k] == n:
                d[k] = len(keep)
        if keep != list(range(len(keep))):  # positions moved: the period/offset rule no longer holds
            for period in ("attn_layer_period", "expert_layer_period"):
                if isinstance(d.get(period), int):
                    raise ValueError(f"{config.model_type}: cannot subset layers of a periodic layout")
    for k in ("encoder_layers", "decoder_layers", "num_encoder_layers", "num_decoder_layers"):  # no per-layer types
        if isinstance(d.get(k), int) and d[k] > 2 and not any(isinstance(v, list) and len(v) == d[k]
                                                              for v in d.values()):
            d[k] = 2
    for sub, value in list(d.items()):  # nested configs (text, vision, audio, patcher, ...) shrink the same way
        if isinstance(value, dict) and any(k in value for k in ("hidden_size", "num_hidden_layers", "d_model")):
            d[sub] = _shrink_dict(value, getattr(config, sub, None))
    if isinstance(d.get("intermediate_size"), list):
        d["intermediate_size"] = [2 * HIDDEN] * len(d["intermediate_size"])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int) and d[key] >= VOCAB:
            d[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key]
    for k, v in OVERRIDES.get(d.get("model_type"), {}).items():  # nested dicts merge, other values replace
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    d.pop("transformers_version", None)
    return type(config).from_dict(d)


def _shrink_dict(d: dict, sub_config) -> dict:
    from transformers import CONFIG_MAPPING, PreTrainedConfig

    if isinstance(sub_config, PreTrainedConfig):
        return shrink(sub_config).to_dict()
    if d.get("model_type") in CONFIG_MAPPING:
        return shrink(CONFIG_MAPPING[d["model_type"]].from_dict(d)).to_dict()
    return _shrink_flat(d)


def _shrink_flat(d: dict) -> dict:
    return _mla_heads({k: (SIZES[k] if k in SIZES and isinstance(v, int) and not isinstance(v, bool) else v)
                       for k, v in d.items()}, d)


def _mla_heads(d: dict, original: dict) -> dict:
    """Multi-head latent attention expands the latent to every query head: where the default has as many
    key/value heads as query heads, the tiny config does too."""
    if "kv_lora_rank" in d and "num_key_value_heads" in d and (
            original.get("num_key_value_heads") in (None, original.get("num_attention_heads"))):
        d["num_key_value_heads"] = d["num_attention_heads"]
    return d


def _hashable(v):
    return tuple(v) if isinstance(v, list) else (tuple(sorted(v.items())) if isinstance(v, dict) else v)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random tiny instance of the causal LM transformers registers for `model_type`, in eval mode, fp32."""
    import transformers
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = shrink(CONFIG_MAPPING[model_type]())
    expected = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    if not isinstance(config, expected.config_class):  # e.g. musicgen: the causal LM is built on the decoder
        config = next((getattr(config, k) for k in getattr(config, "sub_configs", {})
                       if isinstance(getattr(config, k, None), expected.config_class)), config)
    # Encoders that double as causal LMs (BERT, RoBERTa, ...) attend causally only with is_decoder=True, which is
    # how their causal-LM classes are meant to be built.
    if not getattr(config, "is_encoder_decoder", False):
        config.is_decoder = True
    for k, v in overrides.items():
        setattr(config, k, v)
    # The auto class picks the text sub-config of composite configs (qwen3_5, llama4, emu3, ...) itself;
    # a sub-config it does not register (musicgen's decoder) goes to the mapped class directly.
    registered = type(config) in AutoModelForCausalLM._model_mapping
    build = AutoModelForCausalLM.from_config if registered else expected._from_config
    with torch.device("meta"):  # count first: a size this module does not know would otherwise stay huge
        meta = build(config)
    if type(meta) is not expected:
        raise TypeError(f"{model_type}: built {type(meta).__name__}, expected {expected.__name__}")
    n = sum(p.numel() for p in meta.parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"{model_type}: the shrunk config still has {n:,} parameters (> {MAX_PARAMETERS:,})")
    torch.manual_seed(seed)
    model = build(config)
    for k, v in GENERATION_OVERRIDES.get(model_type, {}).items():
        setattr(model.generation_config, k, v)
    # Random init gives near-uniform attention; larger query/key weights make patterns (and bugs) visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(k in name for k in ("q_proj", "k_proj", "qkv_proj", "query", "key")):
                p.mul_(math.sqrt(8.0))
    return model.eval()
