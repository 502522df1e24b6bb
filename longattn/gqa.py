"""Grouped-query conversion: turn a multi-head (or GQA) checkpoint into one with fewer key/value heads by
mean-pooling the key and value projections of each group (Ainslie et al. 2023, GQA, arXiv:2305.13245)."""
from __future__ import annotations

import torch
from torch import nn

from .patching import _check_supported


def _pool_rows(weight: torch.Tensor, heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """Rows [heads * head_dim, ...] -> [new_heads * head_dim, ...], each new head the mean of its group."""
    rest = weight.shape[1:]
    w = weight.reshape(new_heads, heads // new_heads, head_dim, *rest)
    return w.mean(dim=1).reshape(new_heads * head_dim, *rest)


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(like.weight.requires_grad)
    return layer


@torch.no_grad()
def convert_to_gqa(model, num_key_value_heads: int):
    """Rewrite every attention layer to `num_key_value_heads` KV heads (1 = MQA) in place; returns the model.

    Key and value projections (and biases) of each group of heads are averaged; the config is updated, so
    `save_pretrained` / `from_pretrained` round-trip. A model that already has that many KV heads is unchanged.
    Fused QKV projections (Phi3) are split and re-fused. Models normalizing keys across all heads at once
    (OLMo2's k_norm) get their norm weights pooled the same way; that normalization then spans fewer heads,
    so conversion there is an approximation to be uptrained, like any pooled GQA.
    """
    mods = _check_supported(model)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    g = num_key_value_heads
    if not isinstance(g, int) or g < 1 or kv_heads % g or heads % g:
        raise ValueError(f"num_key_value_heads must be a positive divisor of the model's {kv_heads} key/value "
                         f"heads (and of its {heads} query heads), got {g!r}")
    if g == kv_heads:
        return model
    for m in mods:
        d = m.head_dim
        if hasattr(m, "qkv_proj"):  # Phi3: [q; k; v] rows in one Linear
            w = m.qkv_proj.weight
            q, k, v = w.split([heads * d, kv_heads * d, kv_heads * d])
            parts = [q, _pool_rows(k, kv_heads, g, d), _pool_rows(v, kv_heads, g, d)]
            bias = None
            if m.qkv_proj.bias is not None:
                bq, bk, bv = m.qkv_proj.bias.split([heads * d, kv_heads * d, kv_heads * d])
                bias = torch.cat([bq, _pool_rows(bk, kv_heads, g, d), _pool_rows(bv, kv_heads, g, d)])
            m.qkv_proj = _linear_from(torch.cat(parts), bias, m.qkv_proj)
        elif hasattr(m, "k_proj") and hasattr(m, "v_proj"):
            for name in ("k_proj", "v_proj"):
                lin = getattr(m, name)
                bias = None if lin.bias is None else _pool_rows(lin.bias, kv_heads, g, d)
                setattr(m, name, _linear_from(_pool_rows(lin.weight, kv_heads, g, d), bias, lin))
        else:
            raise ValueError(f"convert_to_gqa: {type(m).__name__} has neither k_proj/v_proj nor qkv_proj")
        norm = getattr(m, "k_norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.numel() == kv_heads * d:
            norm.weight = nn.Parameter(_pool_rows(norm.weight, kv_heads, g, d))
        if hasattr(m, "num_key_value_heads"):
            m.num_key_value_heads = g
        if hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = heads // g
    cfg.num_key_value_heads = g
    return model


def kv_cache_bytes_per_token(config, dtype=torch.float32) -> int:
    """Key + value bytes one token adds to the cache across all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv * head_dim * torch.finfo(dtype).bits // 8
