"""Dense (exact) attention with four interchangeable backends, each able to return the log-sum-exp.

Shapes: query [B, Hq, Q, D]; key, value [B, Hkv, K, D] with Hq a multiple of Hkv (GQA stays unexpanded
wherever the backend allows). Output [B, Hq, Q, D]; LSE [B, Hq, Q] in float32, natural log of the sum of
exp(scaled scores) over allowed keys (-inf for a query that may attend to nothing; its output is 0).

Backends:
  sdpa   torch's scaled_dot_product_attention (LSE through torch's CPU flash / CUDA efficient kernels)
  flex   FlexAttention, compiled once per shape; block-sparse masks skip masked blocks entirely
  flash  flash-attn (CUDA only, optional extra); padding through its variable-length API
  math   the explicit computation in query chunks: the reference, and the path for soft-capping with grads
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .masks import AttentionMask
from .primitives import (MATH_QUERY_CHUNK, cpu_flash_forward, cuda_efficient_forward, flash_attn_available,
                         softmax_lse)

BACKENDS = ("auto", "sdpa", "flex", "flash", "math")


def choose_backend(query: torch.Tensor, mask: AttentionMask | None, softcap: float | None,
                   requested: str = "auto") -> str:
    """Resolve "auto" to a concrete backend, and refuse a requested one that cannot run here."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {requested!r}")
    needs_grad = torch.is_grad_enabled() and query.requires_grad
    if requested == "auto":
        if flash_attn_available(query) and mask is not None and mask.structured:
            return "flash"
        if softcap is None:
            return "sdpa"
        # SDPA has no logit soft-capping; FlexAttention does, but has no backward on CPU.
        return "flex" if (query.is_cuda or not needs_grad) and mask is not None and mask.q_len > 1 else "math"
    if requested == "sdpa" and softcap is not None:
        raise ValueError("backend 'sdpa' cannot apply logit soft-capping (softcap); use 'flex', 'math' or 'auto'")
    if requested == "flex" and needs_grad and not query.is_cuda:
        raise RuntimeError("FlexAttention has no backward pass on CPU (torch 2.x); use backend 'sdpa' or 'math'")
    if requested == "flash":
        if not query.is_cuda:
            raise RuntimeError("backend 'flash' needs CUDA tensors; this call is on " + str(query.device))
        if not flash_attn_available():
            raise RuntimeError("backend 'flash' needs the flash-attn package: pip install 'longattn[gpu]'")
    return requested


def dense_attention(query, key, value, mask: AttentionMask | None = None, *, scale: float | None = None,
                    softcap: float | None = None, dropout: float = 0.0, backend: str = "auto",
                    return_lse: bool = False, learned_sinks: torch.Tensor | None = None):
    """Exact softmax attention over the pairs `mask` allows (None: bottom-right causal over all keys).
    `learned_sinks` [Hq]: one extra logit per head in each softmax denominator, with a zero value."""
    if learned_sinks is not None:
        out, lse = dense_attention(query, key, value, mask, scale=scale, softcap=softcap, dropout=dropout,
                                   backend=backend, return_lse=True)
        return apply_learned_sinks(out, lse, learned_sinks, return_lse)
    if mask is None:
        mask = AttentionMask.causal(query.shape[2], key.shape[2], batch_size=query.shape[0], device=query.device)
    backend = choose_backend(query, mask, softcap, backend)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if dropout and backend != "sdpa":
        raise ValueError(f"attention dropout is only supported by the 'sdpa' backend, not {backend!r}")
    fn = {"sdpa": _sdpa, "flex": _flex, "flash": _flash, "math": _math}[backend]
    return fn(query, key, value, mask, scale=scale, softcap=softcap, dropout=dropout, return_lse=return_lse)


def apply_learned_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, return_lse: bool = False):
    """Add one logit per head (`sinks` [H]) with a zero value to softmax attention already computed as `out`
    [B, H, Q, D] with log-sum-exp `lse` [B, H, Q]: each output shrinks by exp(lse) / (exp(lse) + exp(sink))
    (gpt-oss's learned attention sinks; OpenAI 2025, gpt-oss model card, arXiv:2508.10925)."""
    sink = sinks.float().view(1, -1, 1)
    factor = torch.sigmoid(lse.float() - sink)
    out = (out.float() * factor.unsqueeze(-1)).to(out.dtype)
    return (out, torch.logaddexp(lse.float(), sink.expand_as(lse))) if return_lse else out


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


# ------------------------------------------------------------------------------------------------ sdpa
def _sdpa(q, k, v, mask: AttentionMask, *, scale, softcap, dropout, return_lse):
    attn_mask = mask.dense()
    q_len, kv_len = q.shape[2], k.shape[2]
    # None stands for plain causal: SDPA's is_causal is top-left aligned, which is bottom-right when Q == K,
    # and a single query may see every key. With Q < K and no mask, only the first Q keys are real (an empty
    # static cache being prefilled), exactly as transformers treats it.
    is_causal = attn_mask is None and q_len > 1
    if is_causal and kv_len > q_len:
        k, v = k[:, :, :q_len], v[:, :, :q_len]
    return sdpa_tensors(q, k, v, attn_mask, is_causal=is_causal, scale=scale, dropout=dropout,
                        return_lse=return_lse)


def sdpa_tensors(q, k, v, attn_mask: torch.Tensor | None, *, is_causal: bool, scale: float, dropout: float = 0.0,
                 return_lse: bool = False, float_bias: torch.Tensor | None = None):
    """SDPA on tensors with a boolean mask (True = attend, broadcastable to [..., Q, K]) or an additive
    `float_bias` (0 / -inf; cheaper on CPU), and GQA heads."""
    groups = q.shape[-3] // k.shape[-3]
    if float_bias is not None:
        if not return_lse:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=float_bias, dropout_p=dropout, scale=scale,
                                                  enable_gqa=groups > 1)
        attn_mask = float_bias == 0
    if not return_lse:
        # Unexpanded GQA when no mask is given (all kernels support it); with a mask, CUDA kernels need
        # expanded heads to avoid the slow math fallback, and the CPU result is the same either way.
        gqa = groups > 1 and (attn_mask is None or not q.is_cuda)
        if groups > 1 and not gqa:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale,
                                              is_causal=is_causal, enable_gqa=gqa)
    if dropout:
        raise ValueError("return_lse with attention dropout is not supported")
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    q_len = q.shape[-2]
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
    if q.is_cuda:
        if bias is not None:
            bias = bias.expand(*q.shape[:-1], k.shape[-2])
        out, lse = cuda_efficient_forward(q, k, v, bias, True, 0.0, is_causal, scale=scale)[:2]
        lse = lse[..., :q_len]  # the CUDA kernel pads the LSE's query dimension
    else:
        out, lse = cpu_flash_forward(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
    lse = lse.float()
    if attn_mask is not None:  # a query with no allowed key gets LSE -inf (the kernels report 0)
        lse = lse.masked_fill(~attn_mask.any(-1).expand_as(lse), float("-inf"))
    return out, lse


# ------------------------------------------------------------------------------------------------ flex
@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled callable; torch.compile caches a graph per input shape/dtype behind it.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask: AttentionMask, *, scale, softcap, dropout, return_lse):
    def softcapped(score, b, h, qi, ki):
        return softcap * torch.tanh(score / softcap)

    score_mod = softcapped if softcap is not None else None
    groups = q.shape[1] // k.shape[1]
    block_mask = mask.block_mask()
    fn = _compiled_flex() if q.shape[2] > 1 else _eager_flex()
    if return_lse and q.is_cuda:
        out, lse = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=groups > 1,
                      return_lse=True)
        return out, lse.float()
    out = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=groups > 1)
    if not return_lse:
        return out
    # torch's compiled CPU FlexAttention cannot return the LSE (torch 2.13): an exact chunked pass supplies it.
    return out, _math(q, k, v[..., :0], mask, scale=scale, softcap=softcap, dropout=0.0, return_lse=True)[1]


def _eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention  # a single decode query: nothing worth compiling, and no S x S to materialize


# ----------------------------------------------------------------------------------------------- flash
def _flash(q, k, v, mask: AttentionMask, *, scale, softcap, dropout, return_lse):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if not mask.structured:
        raise ValueError("backend 'flash' expresses only causal masks with padding and a sliding window; "
                         "this mask has another pattern: use backend 'sdpa' or 'flex'")
    window = (-1, -1) if mask.window is None else (mask.window - 1, 0)
    kw = dict(softmax_scale=scale, causal=mask.is_causal, window_size=window, softcap=softcap or 0.0,
              dropout_p=dropout, return_attn_probs=return_lse)
    # flash-attn wants [B, S, H, D]; its causal mask is bottom-right aligned, like ours.
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    qpad, kpad = mask.query_padding(), mask.key_padding()
    if kpad is None or bool(kpad.all()):
        res = flash_attn_func(qt, kt, vt, **kw)
        out, lse = (res[0], res[1]) if return_lse else (res, None)
        out = out.transpose(1, 2)
        return (out, lse.float()) if return_lse else out
    # Variable-length path: drop padded tokens, run packed sequences, scatter back (padded queries -> 0).
    b, hq, s_q, d = q.shape
    q_idx, k_idx = qpad.flatten().nonzero().squeeze(1), kpad.flatten().nonzero().squeeze(1)
    cu_q = F.pad(qpad.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(kpad.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    res = flash_attn_varlen_func(
        qt.flatten(0, 1)[q_idx], kt.flatten(0, 1)[k_idx], vt.flatten(0, 1)[k_idx], cu_q, cu_k,
        int(qpad.sum(1).max()), int(kpad.sum(1).max()), **kw)
    packed = res[0] if return_lse else res
    out = packed.new_zeros(b * s_q, hq, d).index_copy_(0, q_idx, packed).view(b, s_q, hq, d).transpose(1, 2)
    if not return_lse:
        return out
    lse_packed = res[1]  # [Hq, total_q]
    lse = lse_packed.new_full((hq, b * s_q), float("-inf")).index_copy_(1, q_idx, lse_packed)
    return out, lse.view(hq, b, s_q).transpose(0, 1).float()


# ------------------------------------------------------------------------------------------------ math
def _math(q, k, v, mask: AttentionMask, *, scale, softcap, dropout, return_lse):
    """Scores in query chunks, soft-capped, masked, softmax in float32 (as transformers' eager path)."""
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    allowed = mask.materialize() if mask.dense_builder is None else mask.dense()
    if allowed is None:
        allowed = AttentionMask.causal(q.shape[2], k.shape[2], batch_size=q.shape[0], device=q.device).materialize()
    outs, lses = [], []
    for start in range(0, q.shape[2], MATH_QUERY_CHUNK):
        qc = q[:, :, start:start + MATH_QUERY_CHUNK]
        scores = torch.matmul(qc, k.transpose(-1, -2)) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        m = allowed[:, :, start:start + MATH_QUERY_CHUNK]
        probs, lse = softmax_lse(scores.float().masked_fill(~m, float("-inf")))
        outs.append(torch.matmul(probs.to(v.dtype), v))
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    return (out, torch.cat(lses, dim=2)) if return_lse else out
