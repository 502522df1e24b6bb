"""Attention math with no Hugging Face knowledge: dense backends (with log-sum-exp) and masks."""
from .dense import BACKENDS, choose_backend, dense_attention
from .primitives import flash_attn_available
from .masks import AttentionMask

__all__ = ["AttentionMask", "BACKENDS", "choose_backend", "dense_attention", "flash_attn_available"]
