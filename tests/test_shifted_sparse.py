"""LongLoRA S2-Attn and SinkLoRA SF-Attn against explicit per-head masks, with gradients (training methods)."""
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask, dense_attention
from longattn.methods import AttendCall, S2Attn, SFAttn
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def s2_mask(s, g, hq, padding):
    """LongLoRA as its code computes it: heads of the second half see the sequence rolled left by g/2."""
    b = padding.shape[0]
    allowed = torch.zeros(b, hq, s, s, dtype=torch.bool)
    for h in range(hq):
        shift = 0 if h < hq // 2 else g // 2
        for i in range(s):
            for j in range(s):
                ri, rj = (i - shift) % s, (j - shift) % s  # positions in the rolled sequence
                allowed[:, h, i, j] = (ri // g == rj // g) and rj <= ri
    return allowed & padding[:, None, None, :]


def sf_mask(s, g, sinks, hq, padding):
    b = padding.shape[0]
    allowed = torch.zeros(b, hq, s, s, dtype=torch.bool)
    for bi in range(b):
        first = int(padding[bi].nonzero()[0])
        for h in range(hq):
            shift = 0 if h < hq // 2 else g // 2
            for i in range(s):
                for j in range(i + 1):
                    same = (i - first + shift) // g == (j - first + shift) // g
                    allowed[bi, h, i, j] = (same or first <= j < first + sinks) and bool(padding[bi, j])
    return allowed


def run_both(method, s, mask_fn, backend_mask):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, s, dtype=torch.bool)
    pad[1, :5] = False
    allowed = mask_fn(pad)
    rows = allowed.any(-1, keepdim=True)
    cot = torch.randn(q.shape, generator=g)
    results = []
    for kind in ("reference", "method"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if kind == "reference":
            out = dense_attention(*leaves, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
        else:
            call = AttendCall(scale=0.25)
            out = method.attend(*leaves, AttentionMask.causal(s, batch_size=2, padding=pad), call)
        (out * rows * cot).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    (ref, ref_g), (got, got_g) = results
    torch.testing.assert_close(got * rows, ref * rows, atol=1e-5, rtol=0)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    return allowed


@pytest.mark.parametrize("g, s", [(8, 32), (4, 24), (32, 32)])
def test_s2_attn_equals_rolled_group_mask_with_gradients(g, s):
    run_both(S2Attn(group_size=g), s, lambda pad: s2_mask(s, g, 4, pad), None)
    causal = AttentionMask.causal(s)
    call = AttendCall(scale=0.25)
    S2Attn(group_size=g).attend(*(torch.randn(1, 2, s, 8) for _ in range(3)), causal, call)
    assert call.attended_pairs == int(s2_mask(s, g, 2, torch.ones(1, s, dtype=torch.bool))[0, 0].sum())


@pytest.mark.parametrize("backend", ["gathered", "sdpa"])
@pytest.mark.parametrize("g, sinks, s", [(8, 2, 30), (4, 0, 23), (6, 3, 29)])
def test_sf_attn_equals_explicit_mask_with_gradients(backend, g, sinks, s, monkeypatch):
    from longattn.kernels import gathered

    monkeypatch.setattr(gathered, "GATHER_BLOCK", 8)
    run_both(SFAttn(group_size=g, sink_tokens=sinks, backend=backend), s,
             lambda pad: sf_mask(s, g, sinks, 4, pad), None)
    explicit = sf_mask(s, g, sinks, 2, torch.ones(1, s, dtype=torch.bool))
    assert SFAttn(group_size=g, sink_tokens=sinks).computed_pairs(AttentionMask.causal(s)) == \
        int(explicit.sum()) // 2


def test_sf_attn_decode_equals_prefill():
    model = make_model("qwen3")
    ids, _ = left_padded_batch()
    ids = ids[:1]
    longattn.patch(model, "sf_attn", group_size=6, sink_tokens=2)
    assert_decode_matches_prefill(model, ids)


def test_s2_attn_trains_through_a_model():
    model = make_model("llama").train()
    ids, mask = left_padded_batch(length=24)
    longattn.patch(model, "s2_attn", group_size=8)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # decoding steps attend fully (LongLoRA's inference setting)
        model.eval().generate(input_ids=ids[:1, :16], max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_errors():
    q = torch.randn(1, 4, 20, 8)
    with pytest.raises(ValueError, match="multiple of group_size"):
        S2Attn(group_size=8).attend(q, q, q, AttentionMask.causal(20), AttendCall(scale=0.3))
    with pytest.raises(ValueError, match="even number of query and key/value heads"):
        S2Attn(group_size=4).attend(q[:, :3], q[:, :3], q[:, :3], AttentionMask.causal(20),
                                           AttendCall(scale=0.3))
    with pytest.raises(ValueError, match="'group_size' must be an even integer >= 2"):
        SFAttn(group_size=5)
    with pytest.raises(ValueError, match="'sink_tokens' must be an integer >= 0"):
        SFAttn(sink_tokens=-1)


@pytest.mark.parametrize("name", ["s2_attn", "sf_attn"])
@pytest.mark.parametrize("density", [0.05, 0.25, 0.5])
def test_density_sets_the_group(name, density):
    """density -> the smallest even group reaching it over density_length tokens (S2: one that divides it)."""
    from longattn.kernels.masks import AttentionMask
    from longattn.methods import make_method

    method = make_method(name, density=density, density_length=1024)
    mask = AttentionMask.causal(1024)

    def reached(group):
        if name == "s2_attn":
            return (group + 1) / 1025
        return make_method(name, group_size=group).computed_pairs(mask) / mask.causal_pair_count()

    g = method.group_size
    assert g % 2 == 0 and reached(g) >= density
    smaller = [h for h in range(2, g, 2) if name == "sf_attn" or 1024 % h == 0]
    assert not smaller or reached(max(smaller)) < density
    with pytest.raises(ValueError, match="either group_size or density"):
        make_method(name, group_size=64, density=density, density_length=1024)
