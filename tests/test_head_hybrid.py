"""head_hybrid: full KV heads dense, the others sinks + window, against an explicit per-layer, per-head mask."""
import pytest
import torch

import longattn
from longattn.kernels.dense import dense_attention
from longattn.kernels.masks import AttentionMask
from longattn.methods import HeadHybrid
from longattn.methods.base import AttendCall
from conftest import eager_logits_with_allowed, left_padded_batch, make_model

SINKS, WINDOW = 2, 5


def allowed_per_head(full_kv, n_q, n_kv, pad, q_len=None):
    """[B, Hq, Q, K]: full KV heads' query heads see every causal real key; the others the first SINKS real
    keys of their row and the WINDOW most recent."""
    b, s = pad.shape
    q_len = q_len or s
    out = torch.zeros(b, n_q, q_len, s, dtype=torch.bool)
    g = n_q // n_kv
    for bi in range(b):
        first = int(pad[bi].nonzero()[0])
        for qh in range(n_q):
            for qi in range(q_len):
                qa = s - q_len + qi
                for k in range(qa + 1):
                    if not pad[bi, k]:
                        continue
                    full = (qh // g) in full_kv
                    out[bi, qh, qi, k] = full or k < first + SINKS or qa - k < WINDOW
    return out


@pytest.mark.parametrize("full_kv", [[1], [0, 2], [], [0, 1, 2]])
def test_kernel_level_equals_explicit_per_head_mask(full_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 23, 16, generator=g) * 2
    k, v = (torch.randn(2, 3, 23, 16, generator=g) * 2 for _ in range(2))
    pad = torch.ones(2, 23, dtype=torch.bool)
    pad[1, :4] = False
    method = HeadHybrid(full_heads={0: full_kv}, sink_tokens=SINKS, window=WINDOW)
    call = AttendCall(scale=0.25, layer_idx=0)
    got = method.attend(q, k, v, AttentionMask.causal(23, batch_size=2, padding=pad), call)
    allowed = allowed_per_head(full_kv, 6, 3, pad)
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got * rows, ref * rows, atol=1e-5, rtol=0)
    causal = AttentionMask.causal(23)
    # pairs per sequence (unpadded count), averaged over the KV heads
    want = (len(full_kv) * causal.pair_count() + (3 - len(full_kv)) * causal.pair_count(WINDOW, sink_tokens=SINKS)) / 3
    method.attend(q[:1], k[:1], v[:1], causal, call)
    assert call.attended_pairs == round(want)


FULL = {0: [1], 2: [0]}  # layer 1 has no full head


def _reference_logits(model, ids, mask):
    """The unpatched model's eager attention with each layer's explicit per-head mask."""
    def allowed_for(module, query, key):
        return allowed_per_head(FULL.get(module.layer_idx, []), query.shape[1], module.config.num_key_value_heads,
                                mask.bool(), q_len=query.shape[2])

    return eager_logits_with_allowed(model, ids, mask, allowed_for)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_logits_equal_per_layer_per_head_reference(arch):
    model = make_model(arch)
    ids, mask = left_padded_batch()
    ref = _reference_logits(model, ids, mask)
    longattn.patch(model, "head_hybrid", full_heads=FULL, sink_tokens=SINKS, window=WINDOW)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    longattn.unpatch(model)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
    assert (dense[real] - got[real]).abs().max() > 1e-3  # the streaming heads really dropped context


def _decode_steps(model, ids, prefix):
    """Logits of a `prefix`-token prefill then one token at a time, each forward continuing the cache the
    previous one returned (as generate() does); the cache at the end."""
    cache, steps = None, []
    with torch.no_grad():
        for start, stop in [(0, prefix)] + [(t, t + 1) for t in range(prefix, ids.shape[1])]:
            if stop > start:
                out = model(input_ids=ids[:, start:stop], cache=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits)
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("prefix", [1, 9, 20])
@pytest.mark.parametrize("full", [{0: [1], 2: [0]}, {1: [0, 1], 2: [1]}], ids=["some-heads", "a-whole-layer"])
def test_bounded_cache_decode_equals_prefill(prefix, full):
    """Decoding through the per-head bounded cache gives the prefill's logits, and the cache holds exactly every
    entry of the full heads and the sinks + window - 1 newest of the others (a layer whose heads are all full keeps
    everything while the model's mask is sized for the evicting layers)."""
    model = make_model("llama")
    ids, _ = left_padded_batch()
    ids = ids[:1]
    longattn.patch(model, "head_hybrid", full_heads=full, sink_tokens=SINKS, window=WINDOW)
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits
    steps, cache = _decode_steps(model, ids, prefix)
    torch.testing.assert_close(steps, whole, atol=1e-5, rtol=0)
    assert isinstance(cache, longattn.CompressedCache)
    s = ids.shape[1]
    streaming = list(range(SINKS)) + list(range(s - (WINDOW - 1), s))
    for layer in range(3):
        kept = cache.kept_positions(layer)[0]
        for h in range(2):
            got = sorted(p for p in kept[h].tolist() if p >= 0)
            assert got == (list(range(s)) if h in full.get(layer, []) else streaming), (layer, h)
    per_entry = 2 * 16 * 4  # key + value, head dim 16, fp32
    n_full = sum(map(len, full.values()))
    assert cache.nbytes() == per_entry * (n_full * s + (3 * 2 - n_full) * (SINKS + WINDOW - 1))
    for layer in range(3):
        n = len(full.get(layer, []))
        assert cache.nbytes_per_layer()[layer] == per_entry * (n * s + (2 - n) * (SINKS + WINDOW - 1))


def test_padded_generate_equals_each_row_alone():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    longattn.patch(model, "head_hybrid", full_heads=[[0, 1], [2, 0]], sink_tokens=SINKS, window=WINDOW)
    together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row in range(2):
        real = mask[row].bool()
        alone = model.generate(ids[row:row + 1, real], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist()
    meter = longattn.patch_state(model).meter
    assert 0 < meter.density("prefill") < 1 and 0 < meter.density("decode") < 1


def test_heads_from_a_profile_file(tmp_path):
    from longattn.heads import HeadProfile

    prof = HeadProfile("m", [0, 1, 2], 4, 2, {"retrieval": [[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 0.2, 0.3],
                                                              [0.5, 0.0, 0.0, 0.0]]}, {})
    path = prof.save(tmp_path / "p.json")
    m = HeadHybrid(profile=str(path), share=0.5)  # 3 of 6 KV heads: scores (max of 2 query heads) .9 .5 .3
    assert m.full == {0: [0], 1: [1], 2: [0]}
    assert "full" not in m.params()
    rand = HeadHybrid(profile=str(path), share=0.5, select="random", seed=1).full
    assert sum(map(len, rand.values())) == 3 and rand == HeadHybrid(profile=str(path), share=0.5, select="random",
                                                                      seed=1).full
    assert HeadHybrid(profile=str(path), share=0.34, select="layers").full == {0: [0, 1]}  # mean .25 > .125


@pytest.mark.parametrize("params, message", [
    ({}, "'full_heads' must be given"),
    ({"full_heads": {0: [1]}, "profile": "p.json"}, "'full_heads' must be given"),
    ({"full_heads": {0: 1}}, r"full_heads\[0\] must be a list"),
    ({"full_heads": [[0]]}, r"items must be \[layer, kv_head\]"),
    ({"full_heads": {0: [-1]}}, ">= 0"),
    ({"full_heads": {0: [1]}, "share": 0}, "'share' must be in"),
    ({"profile": "/nonexistent.json"}, "head profile not found"),
    ({"full_heads": {0: [1]}, "select": "best"}, "'select' must be one of"),
    ({"full_heads": {0: [1]}, "window": 1}, "'window' must be an integer >= 2"),
])
def test_bad_parameters(params, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        HeadHybrid(**params)


def test_head_out_of_range_is_an_error():
    model = make_model("llama")
    longattn.patch(model, "head_hybrid", full_heads={0: [5]})
    with pytest.raises(ValueError, match="layer 0 has 2 KV heads; full_heads names \\[5\\]"):
        model(input_ids=torch.tensor([[3, 4, 5]]))
