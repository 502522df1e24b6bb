"""KDGQA / DGQA / PGQA (arXiv:2408.08454): each equals a slow explicit reference (plain loops over heads and
queries, float64), through the kernel call and through a patched model; DGQA's state moves only in training."""
import importlib
import math

import pytest
import torch

import longattn
from longattn.kernels import AttentionMask
from longattn.methods import AttendCall, DynamicGQA, KeyDistributedGQA, PerturbedGQA
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def ref_allocation(norms, heads, min_max):
    """Python-float version of the authors' rule: (min-max normalize), share * heads rounded half to even,
    then the largest count loses one / the smallest gains one until the total is `heads`."""
    w = [float(x) for x in norms]
    if min_max:
        lo, hi = min(w), max(w)
        w = [(x - lo) / (hi - lo) for x in w] if hi > lo else [1.0] * len(w)
    total = sum(w)
    counts = [round(x / total * heads) for x in w]
    while sum(counts) > heads:
        counts[counts.index(max(counts))] -= 1
    while sum(counts) < heads:
        counts[counts.index(min(counts))] += 1
    return counts


def ref_attention(q, k, v, allowed, kv_of_head, scale):
    """softmax(q k^T * scale) v per head with the given KV head, explicit masked rows, float64."""
    b, hq, s_q, _ = q.shape
    out = torch.zeros(b, hq, s_q, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            g = kv_of_head[bi][h] if isinstance(kv_of_head[0], list) else kv_of_head[h]
            for i in range(s_q):
                keys = [j for j in range(k.shape[2]) if allowed[bi, 0, i, j]]
                if not keys:
                    continue
                s = torch.stack([q[bi, h, i].double() @ k[bi, g, j].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[bi, h, i] = sum(p[n] * v[bi, g, j].double() for n, j in enumerate(keys))
    return out


def heads_from_counts(counts):
    return [g for g, c in enumerate(counts) for _ in range(c)]


def frob(x):
    return math.sqrt(sum(float(t) ** 2 for t in x.flatten()))


def tensors(seed=0, b=2, hq=8, hkv=4, s=13, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    # Different key scales per head so that the allocation is far from uniform.
    k = torch.randn(b, hkv, s, d, generator=g) * torch.tensor([0.5, 1.0, 2.0, 3.0][:hkv]).view(1, -1, 1, 1)
    v = torch.randn(b, hkv, s, d, generator=g)
    return q, k, v


def test_allocation_rule_matches_reference_and_sums_to_heads():
    from longattn.methods.key_driven_gqa import allocate

    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        kv = int(torch.randint(1, 6, (1,), generator=g))
        heads = kv * int(torch.randint(1, 5, (1,), generator=g))
        norms = torch.rand(kv, generator=g) * 10
        for mm in (True, False):
            got = allocate(norms, heads, min_max=mm).tolist()
            assert got == ref_allocation(norms.tolist(), heads, mm) and sum(got) == heads


@pytest.mark.parametrize("per_sequence", [False, True])
def test_kdgqa_kernel_equals_reference_with_padding(per_sequence):
    q, k, v = tensors()
    pad = torch.ones(2, 13, dtype=torch.bool)
    pad[1, :3] = False
    mask = AttentionMask.causal(13, batch_size=2, padding=pad)
    got = KeyDistributedGQA(per_sequence=per_sequence, backend="math").attend(q, k, v, mask, AttendCall(scale=0.3))
    # Norms over the real (unpadded) keys, per sequence or summed over the batch.
    norms = [[frob(k[bi, h][pad[bi]]) for h in range(4)] for bi in range(2)]
    if per_sequence:
        owner = [heads_from_counts(ref_allocation(n, 8, True)) for n in norms]
    else:
        owner = heads_from_counts(ref_allocation([norms[0][h] + norms[1][h] for h in range(4)], 8, True))
    allowed = mask.materialize()
    ref = ref_attention(q, k, v, allowed, owner, 0.3)
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got.double() * rows, ref * rows, atol=1e-5, rtol=0)


def test_kdgqa_decode_step_uses_the_norms_of_the_cached_keys():
    """A decode step (one query over 13 cached keys) allocates by the norms of all 13 keys: the defined
    behaviour. It is not the allocation a prefill of 13 tokens used for earlier queries, unless it agrees."""
    q, k, v = tensors(seed=2)
    q = q[:, :, -1:]
    mask = AttentionMask.causal(1, 13, batch_size=2)
    got = KeyDistributedGQA(backend="math").attend(q, k, v, mask, AttendCall(scale=0.3))
    norms = [sum(frob(k[bi, h]) for bi in range(2)) for h in range(4)]
    owner = heads_from_counts(ref_allocation(norms, 8, True))
    torch.testing.assert_close(got.double(), ref_attention(q, k, v, mask.materialize(), owner, 0.3), atol=1e-5, rtol=0)


def test_kdgqa_allocation_is_not_uniform_here():
    q, k, v = tensors()
    counts = KeyDistributedGQA().allocation(k, AttentionMask.causal(13, batch_size=2), 8)
    assert counts.tolist() != [2, 2, 2, 2] and counts.sum() == 8


def test_kdgqa_on_converted_model_equals_reference(monkeypatch):
    """Through patch on a real model converted MHA -> GQA (4 -> 2 KV heads), left-padded batch of 2: in
    every layer the attention output equals the explicit reference computed from that layer's own q, k, v
    (allocation from the batch's key norms), and the logits are those of the patched model."""
    kd = importlib.import_module("longattn.methods.kdgqa")
    model = make_model("llama", num_key_value_heads=4)
    longattn.convert_to_gqa(model, 2)
    ids, mask = left_padded_batch()
    longattn.patch(model, "kdgqa", backend="math")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    errors, owners = [], []
    original = kd.allocated_attention

    def checked(query, key, value, m, kv_index, call, backend="auto"):
        pad = m.key_padding()
        norms = [sum(frob(key[bi, h][pad[bi]]) for bi in range(key.shape[0])) for h in range(key.shape[1])]
        owner = heads_from_counts(ref_allocation(norms, query.shape[1], True))
        owners.append(owner)
        allowed = m.materialize()
        ref = ref_attention(query, key, value, allowed, owner, call.scale)
        out = original(query, key, value, m, kv_index, call, backend)
        rows = allowed.any(-1, keepdim=True)
        errors.append(float(((out.double() - ref) * rows).abs().max()))
        return out

    monkeypatch.setattr(kd, "allocated_attention", checked)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).logits
    assert len(errors) == 3 and max(errors) <= 1e-5, errors
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_dgqa_state_moves_in_training_only_and_matches_reference(monkeypatch):
    model = make_model("qwen2", num_key_value_heads=2)
    ids, _ = left_padded_batch()
    longattn.patch(model, "dgqa", kind="ema", beta=0.9, window=2, backend="math")
    mods = longattn.patching.attention_modules(model)
    with torch.no_grad():
        model(input_ids=ids)  # eval: no state change, uniform grouping
    assert all(m._longattn_dgqa["step"] == 0 and m._longattn_dgqa["counts"].tolist() == [2, 2] for m in mods)
    # Reference EMA over explicit norms of the keys each layer receives, updates at steps 0 and 2 only.
    dg = importlib.import_module("longattn.methods.dgqa")
    original = dg.key_head_norms

    def spy(key, mask, per_sequence):
        spy.last.append(torch.tensor([sum(frob(key[b, h]) for b in range(key.shape[0]))
                                      for h in range(key.shape[1])], dtype=torch.float64))
        return original(key, mask, per_sequence)

    spy.last = []
    monkeypatch.setattr(dg, "key_head_norms", spy)
    model.train()
    for _ in range(3):
        with torch.no_grad():
            model(input_ids=ids)
    model.eval()
    assert len(spy.last) == 2 * 3  # 3 layers x updates at steps 0 and 2
    for li, m in enumerate(mods):
        m0, m2 = spy.last[li], spy.last[3 + li]
        ema = 0.9 * m2 + 0.1 * (0.9 * m0)
        torch.testing.assert_close(m._longattn_dgqa["ema"], ema, atol=0, rtol=1e-6)  # norms in float32
        assert m._longattn_dgqa["counts"].tolist() == ref_allocation(ema.tolist(), 4, False)
        assert m._longattn_dgqa["step"] == 3
    # Eval with the learned static grouping: decoding equals a prefill pass.
    assert_decode_matches_prefill(model, ids[:1])


def test_dgqa_diff_kind_uses_norm_change():
    q, k, v = tensors()
    mod = torch.nn.Module()
    mod.train()
    spec = DynamicGQA(kind="diff", beta=0.5, window=1, backend="math")
    mask = AttentionMask.causal(13, batch_size=2)
    spec.attend(q, k, v, mask, AttendCall(scale=0.3, module=mod))
    k2 = k * torch.tensor([1.0, 3.0, 1.0, 1.5]).view(1, -1, 1, 1)
    got = spec.attend(q, k2, v, mask, AttendCall(scale=0.3, module=mod))
    m0 = [sum(frob(k[b, h]) for b in range(2)) for h in range(4)]
    m1 = [sum(frob(k2[b, h]) for b in range(2)) for h in range(4)]
    c0 = [0.5 * x for x in m0]
    owner = heads_from_counts(ref_allocation([abs(a - c) for a, c in zip(m1, c0)], 8, False))
    ref = ref_attention(q, k2, v, mask.materialize(), owner, 0.3)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


def ref_pgqa(q, k, v, allowed, scale, seed_gen, chunk, q_offset=0):
    """Explicit PGQA: per head h (KV head h // group), per query row i: p = softmax over allowed keys; noise
    z ~ N(0, 1) drawn per query block in the same order, own position zeroed, standardized over the allowed
    keys and rescaled to p's row mean / std; output (p - noise) @ v."""
    b, hq, s_q, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, s_q, d, dtype=torch.float64)
    for start in range(0, s_q, chunk):
        stop = min(start + chunk, s_q)
        z_all = torch.randn((b, hq, stop - start, k.shape[2]), generator=seed_gen, dtype=torch.float32).double()
        for bi in range(b):
            for h in range(hq):
                for i in range(start, stop):
                    keys = [j for j in range(k.shape[2]) if allowed[bi, 0, i, j]]
                    s = torch.tensor([float(q[bi, h, i] @ k[bi, h // group, j]) * scale for j in keys],
                                     dtype=torch.float64)
                    p = torch.softmax(s, 0)
                    z = torch.tensor([0.0 if j == i + q_offset else float(z_all[bi, h, i - start, j]) for j in keys],
                                     dtype=torch.float64)
                    n = len(keys)
                    zs = z.std() if n > 1 else torch.tensor(0.0, dtype=torch.float64)
                    ps = p.std() if n > 1 else torch.tensor(0.0, dtype=torch.float64)
                    zs = zs if zs > 0 else torch.tensor(1.0, dtype=torch.float64)
                    noise = (z - z.mean()) / zs * ps + p.mean()
                    w = p - noise
                    out[bi, h, i] = sum(w[n_] * v[bi, h // group, j].double() for n_, j in enumerate(keys))
    return out


@pytest.mark.parametrize("chunk", [4, 512])
def test_pgqa_training_noise_equals_reference(chunk):
    q, k, v = tensors(seed=1)
    mod = torch.nn.Module()
    mod.train()
    spec = PerturbedGQA(seed=5, query_chunk=chunk)
    mask = AttentionMask.causal(13, batch_size=2)
    got = spec.attend(q, k, v, mask, AttendCall(scale=0.3, module=mod, layer_idx=1))
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 1 * 10_007 + 0)
    ref = ref_pgqa(q, k, v, mask.materialize(), 0.3, gen, chunk)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    # A second call draws new noise; eval mode is plain GQA.
    again = spec.attend(q, k, v, mask, AttendCall(scale=0.3, module=mod, layer_idx=1))
    assert (again - got).abs().max() > 1e-3
    mod.eval()
    plain = spec.attend(q, k, v, mask, AttendCall(scale=0.3, module=mod, layer_idx=1))
    ref0 = ref_attention(q, k, v, mask.materialize(), heads_from_counts([2, 2, 2, 2]), 0.3)
    torch.testing.assert_close(plain.double(), ref0, atol=1e-5, rtol=0)


def test_pgqa_patched_model_trains_with_noise_and_is_gqa_in_eval():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    longattn.patch(model, "pgqa", seed=0)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert (out.logits.detach()[mask.bool()] - ref[mask.bool()]).abs().max() > 1e-3


@pytest.mark.parametrize("params, message", [
    ({"name": "kdgqa", "backend": "nope"}, "'backend' must be one of"),
    ({"name": "dgqa", "kind": "mean"}, "'kind' must be 'ema' or 'diff'"),
    ({"name": "dgqa", "beta": 0}, "'beta' must be in \\(0, 1\\]"),
    ({"name": "dgqa", "window": 0}, "'window' must be an integer >= 1"),
    ({"name": "pgqa", "query_chunk": 0}, "'query_chunk' must be an integer >= 1"),
])
def test_bad_parameters(params, message):
    params = dict(params)
    model = make_model("llama")
    with pytest.raises(ValueError, match=message):
        longattn.patch(model, params.pop("name"), **params)
