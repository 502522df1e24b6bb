"""Block top-k (Quest): the selection equals a slow re-implementation, attention equals dense attention with
the explicit per-head mask of the selected blocks, and prefill equals token-by-token decode."""
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask, dense_attention
from longattn.methods import AttendCall, BlockTopK
from longattn.methods.block_topk import quest_select
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def slow_select(q, k, block_size, top_k=None, density=None):
    """Quest's rule written plainly: per query, its own block plus the top_k - 1 earlier blocks by the bound
    sum_d max(q_d * min_d, q_d * max_d), where min/max run over the block's keys."""
    b, hq, s, d = q.shape
    groups = hq // k.shape[1]
    n_blocks = -(-s // block_size)
    out = torch.zeros(b, hq, s, n_blocks, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            keys = k[bi, h // groups]
            for i in range(s):
                own = i // block_size
                bounds = []
                for j in range(own):
                    blk = keys[j * block_size:(j + 1) * block_size]
                    lo, hi = blk.min(0).values, blk.max(0).values
                    bounds.append((float(torch.maximum(q[bi, h, i] * lo, q[bi, h, i] * hi).sum()), j))
                out[bi, h, i, own] = True
                keep = top_k if density is None else max(1, -(-int(density * 1000) * (own + 1) // 1000))
                for _, j in sorted(bounds, reverse=True)[:keep - 1]:
                    out[bi, h, i, j] = True
    return out


def explicit_mask(selected, block_size, s, padding=None):
    q_pos, k_pos = torch.arange(s).view(-1, 1), torch.arange(s).view(1, -1)
    by_key = selected.gather(-1, (k_pos // block_size).expand(s, s).expand(*selected.shape[:2], s, s))
    allowed = by_key & (k_pos <= q_pos)
    if padding is not None:
        allowed = allowed & padding[:, None, None, :]
    return allowed


@pytest.mark.parametrize("block_size, top_k, density", [(4, 2, None), (5, 3, None), (16, 1, None), (3, None, 0.5),
                                                        (4, None, 0.25)])
def test_selection_equals_slow_rule(block_size, top_k, density):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 37, 8, generator=g), torch.randn(2, 2, 37, 8, generator=g)
    got = quest_select(q, k, AttentionMask.causal(37, batch_size=2), block_size, top_k, density)
    assert torch.equal(got, slow_select(q, k, block_size, top_k, density))


@pytest.mark.parametrize("block_size, top_k, s", [(16, 3, 150), (4, 2, 37), (64, 2, 130)])
def test_attention_equals_explicit_selected_mask(block_size, top_k, s):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, s, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, s, dtype=torch.bool)
    pad[1, :7] = False
    mask = AttentionMask.causal(s, batch_size=2, padding=pad)
    call = AttendCall(scale=0.25)
    got = BlockTopK(block_size=block_size, top_k=top_k).attend(q, k, v, mask, call)
    allowed = explicit_mask(quest_select(q, k, mask, block_size, top_k), block_size, s, pad)
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got * rows, ref * rows, atol=1e-5, rtol=0)
    no_pad = explicit_mask(quest_select(q, k, mask, block_size, top_k), block_size, s)
    assert call.attended_pairs == int(no_pad.sum()) // 8  # per sequence and head, padding not subtracted


def test_all_blocks_selected_equals_dense():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with longattn.patched(model, "block_topk", block_size=4, top_k=6):  # 24 tokens = 6 blocks
            got = model(input_ids=ids, attention_mask=mask).logits
            assert longattn.patch_state(model).meter.density("prefill") == pytest.approx(1.0)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("params", [{"block_size": 4, "top_k": 2}, {"block_size": 3, "top_k": 3},
                                    {"block_size": 4, "top_k": None, "density": 0.3}])
def test_prefill_equals_token_by_token_decode(params):
    """A 16-token prompt (enough blocks for top_k), then one token at a time: same logits as one prefill."""
    model = make_model("qwen3")
    ids, _ = left_padded_batch()
    ids = ids[:1]
    longattn.patch(model, "block_topk", **params)
    assert_decode_matches_prefill(model, ids, prefix=16)


def test_generate_runs_and_reports_density():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    longattn.patch(model, "block_topk", block_size=4, top_k=2)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    meter = longattn.patch_state(model).meter
    assert 0 < meter.density("prefill") < 1 and 0 < meter.density("decode") < 1


@pytest.mark.parametrize("params, message", [
    ({"top_k": 0}, r"'top_k' must be an integer >= 1"),
    ({"top_k": None, "density": 1.5}, r"'density' must be in \(0, 1\]"),
    ({"top_k": None, "density": 0.0}, r"'density' must be in \(0, 1\]"),
    ({"top_k": 4, "density": 0.5}, "exactly one of 'top_k' and 'density'"),
    ({"block_size": 0}, r"'block_size' must be an integer >= 1"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        BlockTopK(**params)


def test_top_k_larger_than_the_number_of_blocks_attends_to_all():
    """As in Quest, a query with fewer blocks than top_k keeps them all: here every query, so it is dense."""
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    got = BlockTopK(block_size=4, top_k=9).attend(q, k, v, AttentionMask.causal(20), AttendCall(scale=0.3))
    ref = dense_attention(q, k, v, AttentionMask.causal(20), scale=0.3, backend="math")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_default_top_k_and_density_alone():
    assert BlockTopK().top_k == 8 and BlockTopK(density=0.25).top_k is None  # density alone is enough


def test_selection_in_query_chunks_equals_one_pass(monkeypatch):
    """Selection is held for SELECT_CHUNK queries at a time; several chunks give exactly the same result."""
    from longattn.methods import block_topk

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 150, 16, generator=g) * 2 for h in (4, 2, 2))
    mask = AttentionMask.causal(150, batch_size=2)
    method = BlockTopK(block_size=8, top_k=4)
    one, chunked = AttendCall(scale=0.25), AttendCall(scale=0.25)
    full = method.attend(q, k, v, mask, one)
    monkeypatch.setattr(block_topk, "SELECT_CHUNK", 64)
    parts = method.attend(q, k, v, mask, chunked)
    torch.testing.assert_close(parts, full, atol=1e-5, rtol=0)  # tiles differ: float rounding only
    assert chunked.attended_pairs == one.attended_pairs
    allowed = explicit_mask(quest_select(q, k, mask, 8, 4), 8, 150)
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    torch.testing.assert_close(parts, ref, atol=1e-5, rtol=0)


def test_decoding_keeps_block_bounds_in_the_cache_and_matches_computing_them(monkeypatch):
    """Quest's page metadata: the cache generate() makes keeps each block's key min / max, updated per token, and
    every attention call takes them from it; the bounds equal those computed from the keys, and decoding with
    them equals decoding from a plain cache."""
    from transformers import DynamicCache

    import longattn.kvcache.quest as quest
    from longattn.kvcache.quest import BlockBoundsLayer
    from longattn.methods.block_topk import block_bounds

    taken, take = [], quest.take_block_bounds
    monkeypatch.setattr(quest, "take_block_bounds", lambda *a: taken.append(take(*a)) or taken[-1])
    model = make_model("llama")
    ids = torch.randint(3, 96, (2, 37), generator=torch.Generator().manual_seed(5))
    longattn.patch(model, "block_topk", block_size=8, top_k=2)
    kept = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True)
    longattn.patch_state(model).method_hook.remove()  # now generate's cache stays a plain one
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                           output_logits=True, cache=DynamicCache(config=model.config))
    assert not any(isinstance(layer, BlockBoundsLayer) for layer in plain.past_key_values.layers)
    longattn.unpatch(model)
    assert len(taken) == 2 * 3 * 6  # two generates, three layers, six forwards
    assert all(b is not None for b in taken[:18]) and all(b is None for b in taken[18:])  # the plain cache has none
    cache = kept.past_key_values
    assert all(isinstance(layer, BlockBoundsLayer) for layer in cache.layers)
    for layer in cache.layers:  # 37 + 5 fed tokens: 6 blocks, the last one partial
        centre, radius, first = block_bounds(layer.keys, 8)
        assert first == 0 and layer.lo.shape[2] == 6
        torch.testing.assert_close((layer.hi + layer.lo) / 2, centre, atol=0, rtol=0)
        torch.testing.assert_close((layer.hi - layer.lo) / 2, radius, atol=0, rtol=0)
    assert torch.equal(kept.sequences, plain.sequences)
    for a, b in zip(kept.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
