"""Attention on one (query block, key block) pair with its log-sum-exp, and the matching backward.

The backward takes the FINAL output and LSE of the whole (distributed) attention, not the block's own: with
P = exp(S - lse_final) and delta = rowsum(dO * O_final), each block's dQ/dK/dV add up to the exact gradient
(the flash-attention backward identity), so a ring only has to add block gradients.

Kernels: on CPU, torch's flash-attention CPU kernels (forward with LSE, backward from a given LSE), called on
strided views (a ring step's query run is a slice of the local shard: no copy) with unexpanded GQA heads
where this torch's kernels take them (no H/Hkv-fold copies of K/V or of their gradients); with CUDA,
flash-attn's forward (it returns the LSE; half precision, unmasked or diagonal-causal blocks) or torch's
memory-efficient SDPA, and a chunked recompute backward in plain torch (flash-attn has no public backward
from a given LSE). "math" forces the plain-torch forward and backward everywhere (the CUDA backward path,
testable on CPU).
"""
from __future__ import annotations

import functools

import torch

from ..kernels.dense import repeat_kv, sdpa_tensors
from ..kernels.primitives import (MATH_QUERY_CHUNK, cpu_flash_backward, cpu_flash_forward, flash_attn_available,
                                  softmax_lse)

BLOCK_BACKENDS = ("auto", "sdpa", "flash", "math")


def check_backend(backend: str) -> None:
    if backend not in BLOCK_BACKENDS:
        raise ValueError(f"sequence-parallel block backend must be one of {list(BLOCK_BACKENDS)}, got {backend!r}")


def block_forward(q, k, v, mask: torch.Tensor | None, is_causal: bool, scale: float, backend: str = "auto"):
    """(out [B, Hq, Q, D] in q's dtype, lse [B, Hq, Q] float32; -inf and out 0 for a row with no key)."""
    if backend == "flash" and not flash_attn_available(q):
        raise RuntimeError("block backend 'flash' needs CUDA half-precision tensors and the flash-attn package")
    if backend in ("auto", "flash") and mask is None and flash_attn_available(q):
        from flash_attn import flash_attn_func

        # flash-attn: [B, S, H, D], GQA native, causal bottom-right aligned (= top-left on a square diagonal).
        out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                                      causal=is_causal, return_attn_probs=True)
        return out.transpose(1, 2), lse.float()
    if backend == "math":
        return _math_forward(q, k, v, mask, is_causal, scale)
    if not q.is_cuda:
        return _cpu_forward(q, k, v, mask, is_causal, scale)
    out, lse = sdpa_tensors(q, k, v, None if mask is None else mask.view(1, 1, *mask.shape), is_causal=is_causal,
                            scale=scale, return_lse=True)
    if mask is not None:  # rows with no allowed key: the kernels leave garbage there, the merge needs 0
        out = out.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
    return out, lse


def block_backward(dout, q, k, v, out, lse, mask: torch.Tensor | None, is_causal: bool, scale: float,
                   backend: str = "auto"):
    """(dq [B, Hq, Q, D], dk, dv [B, Hkv, K, D]) of one block, from the final `out` and `lse` of its rows."""
    # A row that attends to nothing anywhere has lse -inf; +inf makes its probabilities exp(s - inf) = 0.
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    if backend == "math" or q.is_cuda:
        return _math_backward(dout, q, k, v, out, lse, mask, is_causal, scale)
    k, v, groups = _cpu_kv(q, k, v)
    dq, dk, dv = cpu_flash_backward(_rows(dout), _rows(q), k, v, _rows(out), _rows(lse.to(torch.float32)), 0.0,
                                      is_causal, attn_mask=_bias(mask, q), scale=scale)
    if groups > 1:  # expanded K/V (older torch): query heads h * groups ... h * groups + groups - 1 share KV head h
        dk = dk.unflatten(1, (dk.shape[1] // groups, groups)).sum(2)
        dv = dv.unflatten(1, (dv.shape[1] // groups, groups)).sum(2)
    return dq, dk, dv


@functools.cache
def cpu_kernels_take_gqa() -> bool:
    """Whether this torch's CPU flash-attention forward and backward accept fewer KV heads than query heads
    (and compute grouped-query attention: checked against expanded heads once)."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, 8, 4, generator=g) for h in (4, 2, 2, 4))
    kr, vr = repeat_kv(k, 2), repeat_kv(v, 2)
    try:
        out, lse = cpu_flash_forward(q, k, v, 0.0, True, scale=0.5)
        dq, dk, dv = cpu_flash_backward(dout, q, k, v, out, lse, 0.0, True, scale=0.5)
    except RuntimeError:
        return False
    ref_out, ref_lse = cpu_flash_forward(q, kr, vr, 0.0, True, scale=0.5)
    ref = cpu_flash_backward(dout, q, kr, vr, ref_out, ref_lse, 0.0, True, scale=0.5)
    ref_dk, ref_dv = (t.unflatten(1, (2, 2)).sum(2) for t in ref[1:])
    return all(torch.allclose(a, b, atol=1e-5) for a, b in ((out, ref_out), (dq, ref[0]), (dk, ref_dk), (dv, ref_dv)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The CPU kernels take any strides of the outer dimensions; only the innermost must be 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _bias(mask, q):
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))


def _cpu_kv(q, k, v):
    """(k, v, groups still to sum): unexpanded when the kernels take GQA, else repeated to the query heads."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not cpu_kernels_take_gqa():
        return repeat_kv(k, groups), repeat_kv(v, groups), groups
    return _rows(k), _rows(v), 1


def _cpu_forward(q, k, v, mask, is_causal, scale):
    k, v, _ = _cpu_kv(q, k, v)
    out, lse = cpu_flash_forward(_rows(q), k, v, 0.0, is_causal, attn_mask=_bias(mask, q), scale=scale)
    lse = lse.float()
    if mask is not None:  # a row with no allowed key: LSE -inf (the kernel reports 0) and output 0 for the merge
        empty = ~mask.any(-1)
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse


def _allowed_rows(mask, is_causal, start, stop, k_len, device):
    if mask is not None:
        return mask[start:stop]
    if is_causal:
        return torch.arange(start, stop, device=device).view(-1, 1) >= torch.arange(k_len, device=device).view(1, -1)
    return None


def _by_kv_head(q, k):
    """q [B, Hq, Q, D] -> [B, Hkv, G, Q, D] float32, so that GQA needs no repeated keys."""
    return q.float().unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))


def _math_forward(q, k, v, mask, is_causal, scale):
    qg, kf, vf = _by_kv_head(q, k), k.float().unsqueeze(2), v.float().unsqueeze(2)
    outs, lses = [], []
    for start in range(0, q.shape[2], MATH_QUERY_CHUNK):
        stop = min(start + MATH_QUERY_CHUNK, q.shape[2])
        s = torch.matmul(qg[:, :, :, start:stop], kf.transpose(-1, -2)) * scale
        allowed = _allowed_rows(mask, is_causal, start, stop, k.shape[2], q.device)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        p, lse = softmax_lse(s)
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).flatten(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=3).flatten(1, 2)


def _math_backward(dout, q, k, v, out, lse, mask, is_causal, scale):
    qg, kf, vf = _by_kv_head(q, k), k.float().unsqueeze(2), v.float().unsqueeze(2)
    dog, og = _by_kv_head(dout, k), _by_kv_head(out, k)
    lseg = lse.float().unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))
    delta = (dog * og).sum(-1)  # rowsum(dO * O): the softmax Jacobian's correction term
    dq = torch.empty_like(qg)
    dk = torch.zeros_like(kf.squeeze(2))
    dv = torch.zeros_like(dk)
    for start in range(0, q.shape[2], MATH_QUERY_CHUNK):
        stop = min(start + MATH_QUERY_CHUNK, q.shape[2])
        s = torch.matmul(qg[:, :, :, start:stop], kf.transpose(-1, -2)) * scale
        p = torch.exp(s - lseg[..., start:stop].unsqueeze(-1))
        allowed = _allowed_rows(mask, is_causal, start, stop, k.shape[2], q.device)
        if allowed is not None:
            p = p.masked_fill(~allowed, 0.0)
        do = dog[:, :, :, start:stop]
        dv += torch.matmul(p.transpose(-1, -2), do).sum(2)
        ds = p * (torch.matmul(do, vf.transpose(-1, -2)) - delta[..., start:stop].unsqueeze(-1))
        dq[:, :, :, start:stop] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qg[:, :, :, start:stop]).sum(2) * scale
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
