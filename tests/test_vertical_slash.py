"""Vertical-slash (MInference): selection equals a slow re-implementation; attention equals dense attention
with the explicit per-head mask of the selected columns and diagonals; decode steps are dense."""
import math
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask, dense_attention
from longattn.methods import AttendCall, VerticalSlash
from longattn.methods.vertical_slash import vertical_slash_attention, vertical_slash_select
from conftest import left_padded_batch, make_model


def slow_select(q, k, scale, vertical_size, slash_size, last_q, sinks, local):
    b, hq, s, _ = q.shape
    groups = hq // k.shape[1]
    cols, diags = [], []
    for bi in range(b):
        cb, db = [], []
        for h in range(hq):
            vert, slash = [0.0] * s, [0.0] * s
            for i in range(s - last_q, s):
                scores = [float(q[bi, h, i] @ k[bi, h // groups, j]) * scale for j in range(i + 1)]
                m = max(scores)
                z = sum(torch.exp(torch.tensor(x - m)).item() for x in scores)
                for j, x in enumerate(scores):
                    p = torch.exp(torch.tensor(x - m)).item() / z
                    vert[j] += p
                    slash[i - j] += p
            for j in range(sinks):
                vert[j] = float("inf")
            for o in range(local):
                slash[o] = float("inf")
            cb.append(sorted(sorted(range(s), key=lambda j: -vert[j])[:vertical_size]))
            db.append(sorted(sorted(range(s), key=lambda o: -slash[o])[:slash_size]))
        cols.append(cb)
        diags.append(db)
    return cols, diags


def explicit_mask(columns, diagonals, s, padding=None):
    b, h = columns.shape[:2]
    allowed = torch.zeros(b, h, s, s, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            cols, diags = set(columns[bi, hi].tolist()), set(diagonals[bi, hi].tolist())
            for i in range(s):
                for j in range(i + 1):
                    ok = (j in cols or i - j in diags) and (padding is None or bool(padding[bi, j]))
                    allowed[bi, hi, i, j] = ok
    return allowed


def test_selection_equals_slow_rule():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 40, 8, generator=g) * 2, torch.randn(2, 2, 40, 8, generator=g) * 2
    cols, diags = vertical_slash_select(q, k, AttentionMask.causal(40, batch_size=2), 0.35, 5, 6, 8, 2, 3)
    ref_cols, ref_diags = slow_select(q, k, 0.35, 5, 6, 8, 2, 3)
    assert cols.sort(-1).values.tolist() == ref_cols
    assert diags.sort(-1).values.tolist() == ref_diags


@pytest.mark.parametrize("chunk", [512, 7])
@pytest.mark.parametrize("dense_enough", [0.0, 2.0])  # keys contiguous with the mask / gathered per tile
def test_attention_and_lse_equal_explicit_mask(chunk, dense_enough, monkeypatch):
    from longattn.methods import vertical_slash as vs

    monkeypatch.setattr(vs, "QUERY_CHUNK", chunk)
    monkeypatch.setattr(vs, "QUERY_TILE", 8)  # several tiles, a partial last one
    monkeypatch.setattr(vs, "DENSE_ENOUGH", dense_enough)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 45, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, 45, dtype=torch.bool)
    pad[1, :6] = False
    mask = AttentionMask.causal(45, batch_size=2, padding=pad)
    cols, diags = vertical_slash_select(q, k, mask, 0.25, 6, 5, 8, 2, 3)
    allowed = explicit_mask(cols, diags, 45, pad)
    ref, ref_lse = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math",
                                   return_lse=True)
    got, lse = vertical_slash_attention(q, k, v, mask, cols, diags, 0.25, return_lse=True)
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got * rows, ref * rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse[rows[..., 0]], ref_lse[rows[..., 0]], atol=1e-5, rtol=0)
    # gradients flow to q, k, v and match the reference
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (vertical_slash_attention(*leaves, mask, cols, diags, 0.25) * rows).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    (dense_attention(*ref_leaves, AttentionMask.from_tensor(allowed), scale=0.25, backend="math") * rows).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=1e-5)


def test_method_reports_pairs_and_matches_model_level():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 70, 16, generator=g) for h in (4, 4, 4))
    mask = AttentionMask.causal(70)
    method = VerticalSlash(vertical_size=5, slash_size=7, last_q=16, sink_columns=2, local_diagonals=3)
    call = AttendCall(scale=0.25)
    out = method.attend(q, k, v, mask, call)
    cols, diags = vertical_slash_select(q, k, mask, 0.25, 5, 7, 16, 2, 3)
    allowed = explicit_mask(cols, diags, 70)
    assert call.attended_pairs == int(allowed.sum()) // 4
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_decode_steps_and_short_prompts_are_dense():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with longattn.patched(model, "vertical_slash", last_q=64):  # 24-token prompt <= last_q: all dense
            got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0)
            assert longattn.patch_state(model).meter.density() == 1.0
    assert torch.equal(got, ref)


def test_sparse_prefill_through_the_model():
    model = make_model("llama", max_position_embeddings=512)
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), longattn.patched(model, "vertical_slash", vertical_size=8, slash_size=8, last_q=16):
        out = model(input_ids=ids).logits
        density = longattn.patch_state(model).meter.density("prefill")
    assert torch.isfinite(out).all() and 0 < density < 0.3


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_density_sets_the_sizes_and_bounds_the_density(density):
    """density -> columns + diagonals = density x (S + 1) / 2 (split 1 : 2); exact against the explicit mask of
    that selection, and the attended density never exceeds the target."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 90, 16, generator=g) for _ in range(3))
    mask = AttentionMask.causal(90)
    method = VerticalSlash(density=density, last_q=16, sink_columns=2, local_diagonals=3)
    n_cols, n_diags = method.sizes(90)
    assert n_cols + n_diags == max(2, math.floor(density * 91 / 2)) and abs(n_diags - 2 * n_cols) <= 2
    call = AttendCall(scale=0.25)
    out = method.attend(q, k, v, mask, call)
    allowed = explicit_mask(*vertical_slash_select(q, k, mask, 0.25, n_cols, n_diags, 16, 2, 3), 90)
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert 0 < call.attended_pairs / (90 * 91 / 2) <= density


@pytest.mark.parametrize("params, message", [({"vertical_size": 0}, "'vertical_size' must be an integer >= 1"),
                                             ({"density": 0.2, "slash_size": 10}, "either density or"),
                                             ({"density": 1.5}, r"'density' must be in \(0, 1\]"),
                                             ({"last_q": -1}, "'last_q' must be an integer >= 1"),
                                             ({"sink_columns": -2}, "'sink_columns' must be an integer >= 0")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        VerticalSlash(**params)
