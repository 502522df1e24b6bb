"""Every dense backend (and its log-sum-exp) against the slow, obvious computation with an explicit mask."""
import pytest
import torch

from longattn.kernels import AttentionMask, dense_attention
from longattn.kernels.dense import choose_backend
from longattn.kernels.primitives import flash_attn_available


def reference(q, k, v, allowed, scale, softcap=None):
    """Explicit scores, explicit boolean mask, softmax: output and LSE (float64 for a clean reference)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return (p @ v).float(), lse.float()


def qkv(b=2, hq=4, hkv=2, q_len=37, kv_len=37, d=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: (torch.randn(b, h, s, d, generator=g) * 2).to(device=device, dtype=dtype)
    return mk(hq, q_len), mk(hkv, kv_len), mk(hkv, kv_len)


def masks(b, q_len, kv_len):
    pad = torch.ones(b, kv_len, dtype=torch.bool)
    pad[1, :5] = False  # left padding in the second sequence
    return {
        "causal": AttentionMask.causal(q_len, kv_len, batch_size=b),
        "window": AttentionMask.causal(q_len, kv_len, batch_size=b, window=8),
        "padded": AttentionMask.causal(q_len, kv_len, batch_size=b, padding=pad),
        "padded_window": AttentionMask.causal(q_len, kv_len, batch_size=b, window=8, padding=pad),
    }


CPU_BACKENDS = ["sdpa", "math", "flex"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(37, 37), (5, 40), (1, 40)], ids=["prefill", "chunk", "decode"])
@pytest.mark.parametrize("kind", ["causal", "window", "padded", "padded_window"])
def test_backend_matches_reference(backend, shape, kind):
    q_len, kv_len = shape
    q, k, v = qkv(q_len=q_len, kv_len=kv_len)
    mask = masks(2, q_len, kv_len)[kind]
    allowed = mask.materialize()
    ref_out, ref_lse = reference(q, k, v, allowed, 0.25)
    out, lse = dense_attention(q, k, v, mask, scale=0.25, backend=backend, return_lse=True)
    rows = allowed.any(-1, keepdim=True).expand(-1, q.shape[1], -1, -1)  # queries with at least one key
    torch.testing.assert_close(out * rows, ref_out * rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[rows[..., 0]], ref_lse[rows[..., 0]], atol=1e-5, rtol=0)
    assert torch.isneginf(lse[~rows[..., 0]]).all()
    plain = dense_attention(q, k, v, mask, scale=0.25, backend=backend)
    torch.testing.assert_close(plain * rows, out * rows, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["math", "flex"])
def test_softcap_matches_reference(backend):
    q, k, v = qkv(q_len=33, kv_len=33)
    mask = AttentionMask.causal(33, batch_size=2)
    ref_out, ref_lse = reference(q, k, v, mask.materialize(), 0.25, softcap=5.0)
    out, lse = dense_attention(q, k, v, mask, scale=0.25, softcap=5.0, backend=backend, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_gradients_match_reference(backend):
    q, k, v = qkv(q_len=29, kv_len=29)
    mask = masks(2, 29, 29)["padded_window"]
    allowed = mask.materialize()
    rows = allowed.any(-1, keepdim=True).float()
    cotangent = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda *a: reference(*a, allowed, 0.25)[0],
               lambda *a: dense_attention(*a, mask, scale=0.25, backend=backend)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * rows * cotangent).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=0)


def test_auto_backend_choices():
    q, _, _ = qkv()
    mask = AttentionMask.causal(37, batch_size=2)
    assert choose_backend(q, mask, None) == "sdpa"
    assert choose_backend(q, mask, 5.0) == "flex"  # no grad needed: FlexAttention handles soft-capping
    assert choose_backend(q.requires_grad_(), mask, 5.0) == "math"  # FlexAttention has no CPU backward


def test_bad_backend_requests():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_attention(q, k, v, backend="cuda-magic")
    with pytest.raises(ValueError, match="soft-capping"):
        dense_attention(q, k, v, softcap=5.0, backend="sdpa")
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        dense_attention(q.requires_grad_(), k, v, backend="flex")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            dense_attention(q, k, v, backend="flash")


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn needs CUDA and the flash-attn package")
@pytest.mark.parametrize("kind", ["causal", "window", "padded", "padded_window"])
@pytest.mark.parametrize("shape", [(37, 37), (1, 40)], ids=["prefill", "decode"])
def test_flash_matches_reference(kind, shape):
    q_len, kv_len = shape
    q, k, v = qkv(q_len=q_len, kv_len=kv_len, device="cuda", dtype=torch.bfloat16)
    mask = masks(2, q_len, kv_len)[kind]
    mask.padding = None if mask.padding is None else mask.padding.cuda()
    mask.device = "cuda"
    allowed = mask.materialize()
    ref_out, ref_lse = reference(q.float(), k.float(), v.float(), allowed, 0.25)
    out, lse = dense_attention(q, k, v, mask, scale=0.25, backend="flash", return_lse=True)
    rows = allowed.any(-1, keepdim=True).expand(-1, q.shape[1], -1, -1)
    torch.testing.assert_close((out.float() * rows), ref_out * rows, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse[rows[..., 0]], ref_lse[rows[..., 0]], atol=2e-2, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cuda_backends_match_reference(backend):
    q, k, v = qkv(device="cuda")
    mask = AttentionMask.causal(37, batch_size=2, window=8, device="cuda")
    ref_out, ref_lse = reference(q, k, v, mask.materialize(), 0.25)
    out, lse = dense_attention(q, k, v, mask, scale=0.25, backend=backend, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)


def test_flash_plumbing_with_a_stand_in_flash_attn(monkeypatch):
    """No GPU here: check the flash backend's unpad/pad and LSE layout against a CPU stand-in that follows
    flash-attn's documented API (bottom-right causal, window_size=(left, right), LSE [B, H, Q] / [H, total_q])."""
    import sys
    import types

    from longattn.kernels import dense as dense_mod

    def flash_attn_func(q, k, v, softmax_scale, causal, window_size, softcap, dropout_p, return_attn_probs):
        b, sq, _, _ = q.shape
        sk = k.shape[1]
        mask = AttentionMask.causal(sq, sk, batch_size=b,
                                    window=None if window_size[0] < 0 else window_size[0] + 1).materialize()
        out, lse = reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, softmax_scale)
        return (out.transpose(1, 2), lse, None) if return_attn_probs else out.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, softcap,
                               dropout_p, return_attn_probs):
        outs, lses = [], []
        for i in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            o, l, _ = flash_attn_func(q[None, qs], k[None, ks], v[None, ks], softmax_scale, causal, window_size,
                                      softcap, dropout_p, True)
            outs.append(o[0])
            lses.append(l[0])
        out, lse = torch.cat(outs), torch.cat(lses, dim=1)
        return (out, lse, None) if return_attn_probs else out

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
        flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func))
    for kind in ("causal", "window", "padded", "padded_window"):
        for q_len, kv_len in ((37, 37), (1, 40)):
            q, k, v = qkv(q_len=q_len, kv_len=kv_len)
            mask = masks(2, q_len, kv_len)[kind]
            allowed = mask.materialize()
            ref_out, ref_lse = reference(q, k, v, allowed, 0.25)
            out, lse = dense_mod._flash(q, k, v, mask, scale=0.25, softcap=None, dropout=0.0, return_lse=True)
            rows = allowed.any(-1, keepdim=True).expand(-1, q.shape[1], -1, -1)
            torch.testing.assert_close(out * rows, ref_out * rows, atol=1e-5, rtol=0, msg=kind)
            torch.testing.assert_close(lse[rows[..., 0]], ref_lse[rows[..., 0]], atol=1e-5, rtol=0, msg=kind)
