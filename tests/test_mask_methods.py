"""Mask-defined sparse methods (sliding window, sinks + window, dilated, strided): each equals dense attention
with the explicit boolean mask it claims, in prefill and decode, and reports the density it computed."""
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask, dense_attention
from longattn.methods import AttendCall, Dilated, SinkWindow, SlidingWindow, Strided
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def claimed(method, q, k, first_real):
    """The pattern each method claims, for absolute positions q (query) and k (key), written plainly."""
    if k > q:
        return False
    if isinstance(method, SlidingWindow):
        return q - k < method.window
    if isinstance(method, SinkWindow):
        return q - k < method.window or first_real <= k < first_real + method.sink_tokens
    if isinstance(method, Dilated):
        return (q - k) % method.dilation == 0 and (q - k) // method.dilation < method.window
    if isinstance(method, Strided):
        return q - k < method.window or (q - k) % method.stride == 0
    raise AssertionError(method)


def explicit_mask(method, attention_mask, q_len=None, model_window=None):
    b, s = attention_mask.shape
    q_len = s if q_len is None else q_len
    out = torch.zeros(b, 1, q_len, s, dtype=torch.bool)
    for bi in range(b):
        first_real = int(attention_mask[bi].nonzero()[0])
        for qi in range(q_len):
            qa = s - q_len + qi
            for k in range(s):
                out[bi, 0, qi, k] = (claimed(method, qa, k, first_real) and bool(attention_mask[bi, k])
                                     and (model_window is None or qa - k < model_window))
    return out


METHODS = [SlidingWindow(window=5), SinkWindow(sink_tokens=2, window=4), SinkWindow(sink_tokens=0, window=3),
           Dilated(window=4, dilation=3), Dilated(window=30, dilation=2)]
# Positional methods on the dense kernels only (no gathered kernel of their own).
PREDICATE_METHODS = [Strided(window=3, stride=4), Strided(window=1, stride=5)]


@pytest.fixture(params=[128, 4], ids=["block128", "block4_halves"])
def gather_block(request, monkeypatch):
    """Run the gathered kernel with its real tile size and with tiny tiles (many blocks, partial last block);
    with tiny tiles, windows of 3+ keys also take the causal-halves path in inference (real threshold: 900)."""
    import longattn.kernels.causal_halves as causal_halves
    import longattn.kernels.gathered as gathered

    monkeypatch.setattr(gathered, "GATHER_BLOCK", request.param)
    if request.param == 4:
        monkeypatch.setattr(causal_halves, "HALVES_MIN_BLOCK", 2)
    return request.param


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("backend", ["sdpa", "math", "flex", "gathered", "auto"])
def test_kernel_level_equals_explicit_mask(method, backend, gather_block):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 23, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, 23, dtype=torch.bool)
    pad[1, :4] = False
    allowed = explicit_mask(method, pad)
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    method = type(method)(**{**method.params(), "backend": backend})
    got = method.attend(q, k, v, AttentionMask.causal(23, batch_size=2, padding=pad), AttendCall(scale=0.25))
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got * rows, ref * rows, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", PREDICATE_METHODS, ids=repr)
@pytest.mark.parametrize("backend", ["sdpa", "math", "flex", "auto"])
def test_predicate_method_equals_explicit_mask_with_gradients(method, backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 23, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, 23, dtype=torch.bool)
    pad[1, :4] = False
    allowed = explicit_mask(method, pad)
    rows = allowed.any(-1, keepdim=True)
    method = type(method)(**{**method.params(), "backend": backend})
    differentiable = backend != "flex"  # FlexAttention has no backward on CPU

    def run(attention):
        leaves = [x.clone().requires_grad_(differentiable) for x in (q, k, v)]
        out = attention(*leaves) * rows
        if differentiable:
            out.square().sum().backward()
        return out.detach(), [x.grad for x in leaves]

    ref, ref_grads = run(lambda *t: dense_attention(*t, AttentionMask.from_tensor(allowed), scale=0.25,
                                                    backend="math"))
    got, got_grads = run(lambda *t: method.attend(*t, AttentionMask.causal(23, batch_size=2, padding=pad),
                                                  AttendCall(scale=0.25)))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for a, b in zip(got_grads, ref_grads):
        assert (a is None) == (not differentiable) and (a is None or torch.allclose(a, b, atol=1e-4, rtol=0))


@pytest.mark.parametrize("method", METHODS + PREDICATE_METHODS, ids=repr)
@pytest.mark.parametrize("arch, model_window", [("llama", None), ("mistral", 8)])
def test_model_logits_equal_explicit_4d_mask(method, arch, model_window, gather_block):
    """(With 4-query tiles, the strided path runs on transformers' own mask predicates and padding.)"""
    model = make_model(arch)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=explicit_mask(method, mask, model_window=model_window)).logits
        longattn.patch(model, method)
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("backend", ["sdpa", "gathered"])
def test_decode_token_by_token_equals_prefill(method, backend, gather_block):
    model = make_model("qwen3")
    ids, _ = left_padded_batch()
    ids = ids[:1]
    longattn.patch(model, type(method)(**{**method.params(), "backend": backend}))
    assert_decode_matches_prefill(model, ids)


@pytest.mark.parametrize("method", METHODS + PREDICATE_METHODS + [longattn.Dense()], ids=repr)
@pytest.mark.parametrize("q_len, kv_len, model_window", [(23, 23, None), (1, 40, None), (7, 30, None),
                                                         (23, 23, 6), (1, 40, 6)])
def test_computed_pairs_match_the_explicit_mask(method, q_len, kv_len, model_window):
    from longattn.kernels.masks import sliding_window

    mask = AttentionMask.causal(q_len, kv_len)
    if model_window is not None:
        mask = mask.restrict(sliding_window(model_window), window=model_window)
    explicit = explicit_mask(method, torch.ones(1, kv_len, dtype=torch.long), q_len, model_window) \
        if not isinstance(method, longattn.Dense) else mask.materialize()
    assert method.computed_pairs(mask) == int(explicit.sum())
    assert mask.causal_pair_count() == int(AttentionMask.causal(q_len, kv_len).materialize().sum())


def test_density_meter_reports_prefill_and_decode():
    model = make_model("llama")
    ids, _ = left_padded_batch()
    longattn.patch(model, "sliding_window", window=4, layers=[1, 2])
    with torch.no_grad():
        model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    meter = longattn.patch_state(model).meter
    s = ids.shape[1]
    causal, windowed = s * (s + 1) // 2, 4 * s - 6
    assert meter.density("prefill") == pytest.approx((causal + 2 * windowed) / (3 * causal))
    # decode steps at kv lengths s+1, s+2: dense layer 0 attends all, windowed layers 4 each
    assert meter.density("decode") == pytest.approx(((s + 1) + (s + 2) + 2 * 2 * 4) / (3 * ((s + 1) + (s + 2))))


@pytest.mark.parametrize("cls, params, message", [
    (SinkWindow, {"sink_tokens": -1}, r"'sink_tokens' must be an integer >= 0"),
    (SinkWindow, {"window": 0}, r"'window' must be an integer >= 1"),
    (SinkWindow, {"backend": "flash"}, r"flash-attn cannot express sinks"),
    (Dilated, {"dilation": 0}, r"'dilation' must be an integer >= 1"),
    (Dilated, {"window": 1.5}, r"'window' must be an integer >= 1"),
    (Strided, {"stride": 0}, r"'stride' must be an integer >= 1"),
    (Strided, {"window": 2.0}, r"'window' must be an integer >= 1"),
    (Strided, {"backend": "gathered"}, r"'backend' must be one of auto, sdpa, flex, math"),
])
def test_bad_parameters(cls, params, message):
    with pytest.raises(ValueError, match=message):
        cls(**params)


def test_window_differs_from_dense():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask).logits
        with longattn.patched(model, "sliding_window", window=3):
            local = model(input_ids=ids, attention_mask=mask).logits
    assert (dense[0, 3:] - local[0, 3:]).abs().max() > 1e-2  # a window of 3 really drops context
    torch.testing.assert_close(dense[0, :3], local[0, :3], atol=1e-5, rtol=0)  # ... and nothing before it


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_window(bad):
    with pytest.raises(ValueError, match=r"sliding_window: parameter 'window' must be an integer >= 1"):
        SlidingWindow(window=bad)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_gathered_gradients_and_lse_match_reference(method, gather_block):
    from longattn.kernels.gathered import gathered_attention, local_key_index

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 29, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, 29, dtype=torch.bool)
    pad[1, :6] = False
    allowed = explicit_mask(method, pad)
    rows = allowed.any(-1, keepdim=True)
    cot = torch.randn(q.shape, generator=g)
    grads, lses = [], []
    for kind in ("reference", "gathered"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if kind == "reference":
            out, lse = dense_attention(*leaves, AttentionMask.from_tensor(allowed), scale=0.25, backend="math",
                                       return_lse=True)
        else:
            mask = AttentionMask.causal(29, batch_size=2, padding=pad)
            first = pad.long().argmax(-1)
            from longattn.kernels.masks import dilated_window, sinks_and_window, sliding_window
            fn = {SlidingWindow: lambda m: sliding_window(m.window),
                  SinkWindow: lambda m: sinks_and_window(m.sink_tokens, m.window, first),
                  Dilated: lambda m: dilated_window(m.window, m.dilation)}[type(method)](method)
            pattern = mask.restrict(fn)
            span = method.window * getattr(method, "dilation", 1)
            sinks = (0, int(first.max()) + method.sink_tokens - 1) if isinstance(method, SinkWindow) else None
            index = local_key_index(pattern, gather_block, span, sinks)
            out, lse = gathered_attention(*leaves, pattern, index, block_size=gather_block, scale=0.25,
                                          return_lse=True)
        (out * rows * cot).sum().backward()
        grads.append([t.grad for t in leaves])
        lses.append(lse)
    for g_ref, g_got in zip(*grads):  # fp32 backward of two different kernels: rounding ~1e-5 on O(1) grads
        torch.testing.assert_close(g_got, g_ref, atol=2e-5, rtol=1e-5)
    r = rows[..., 0].expand_as(lses[0])
    torch.testing.assert_close(lses[1][r], lses[0][r], atol=1e-5, rtol=0)
    assert torch.isneginf(lses[1][~r]).all()


def test_gathered_never_builds_a_full_score_matrix():
    """At 4096 tokens with a 64-token window, the index holds at most block + window keys per query block."""
    from longattn.kernels.gathered import local_key_index

    mask = AttentionMask.causal(4096)
    index = local_key_index(mask, 128, 64)
    assert index.shape == (32, 128 + 64 - 1)
    sink_index = local_key_index(mask, 128, 64, (0, 3))
    assert sink_index.shape == (32, 4 + 128 + 64 - 1)


def assert_strided_path_equals_reference(method, q, k, v, mask, monkeypatch):
    """`method` takes the zero-copy strided path (checked) and equals its math reference with the explicit
    mask; gradients too, except with sinks (they need inference mode on that path)."""
    from longattn.kernels import gathered

    calls = []
    real = gathered.strided_window_attention
    monkeypatch.setattr(gathered, "strided_window_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    reference = type(method)(**{**method.params(), "backend": "math"})
    with torch.no_grad():
        got = method.attend(q, k, v, mask, AttendCall(scale=0.25))
        ref = reference.attend(q, k, v, mask, AttendCall(scale=0.25))
    assert calls, "the strided fast path was not taken"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    if isinstance(method, SinkWindow):
        return
    grads = []
    for m in (method, reference):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        m.attend(*leaves, mask, AttendCall(scale=0.25)).sum().backward()
        grads.append([t.grad for t in leaves])
    for got_grad, ref_grad in zip(*grads):
        torch.testing.assert_close(got_grad, ref_grad, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [SlidingWindow(window=100), SinkWindow(sink_tokens=4, window=100),
                                    Dilated(window=40, dilation=3)], ids=repr)
@pytest.mark.parametrize("q_len, kv_len, batch", [(700, 700, 2), (300, 1000, 1), (517, 517, 1)])
def test_strided_window_fast_path_equals_reference(method, q_len, kv_len, batch, monkeypatch):
    """Unpadded windows take the zero-copy strided path, and it equals the explicit computation."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(batch, 4, q_len, 16, generator=g)
    k, v = (torch.randn(batch, 2, kv_len, 16, generator=g) for _ in range(2))
    mask = AttentionMask.causal(q_len, kv_len, batch_size=batch)
    assert_strided_path_equals_reference(method, q, k, v, mask, monkeypatch)


@pytest.mark.parametrize("method", [SlidingWindow(window=100), SinkWindow(sink_tokens=4, window=100),
                                    Dilated(window=40, dilation=3)], ids=repr)
@pytest.mark.parametrize("q_len, kv_len", [(700, 700), (300, 1000)])
def test_strided_window_fast_path_with_padding_equals_reference(method, q_len, kv_len, monkeypatch):
    """Key padding (left pads longer than the window, a few, none, and pads inside and at the end of a row)
    stays on the strided path: tiles holding a pad get masks of their own; sinks are each row's first real
    tokens."""
    g = torch.Generator().manual_seed(5)
    batch = 4
    q = torch.randn(batch, 4, q_len, 16, generator=g)
    k, v = (torch.randn(batch, 2, kv_len, 16, generator=g) for _ in range(2))
    padding = torch.ones(batch, kv_len, dtype=torch.bool)
    padding[0, :450] = False  # left pads: whole blocks of pad queries, and windows that end in pads
    padding[1, :37] = False
    padding[3, 500:520] = False  # pads inside the row and at its end (a right-padded training batch)
    padding[3, -60:] = False
    mask = AttentionMask.causal(q_len, kv_len, batch_size=batch, padding=padding)
    assert_strided_path_equals_reference(method, q, k, v, mask, monkeypatch)


@pytest.mark.parametrize("method", [SlidingWindow(window=100), SinkWindow(sink_tokens=4, window=100),
                                    Dilated(window=40, dilation=3), SlidingWindow(window=17)], ids=repr)
@pytest.mark.parametrize("q_len, kv_len, batch, padded", [(700, 700, 2, False), (300, 1000, 1, False),
                                                          (350, 400, 2, False), (517, 517, 1, False),
                                                          (700, 700, 3, True)])
def test_causal_halves_path_equals_reference(method, q_len, kv_len, batch, padded, monkeypatch):
    """In inference, long windows run as two causal halves per block (sinks leading the reversed previous
    half); it equals the explicit mask computation, including queries whose key offset is shorter than a
    block (350 / 400), a block straddling the sinks, GQA and padded rows next to unpadded ones."""
    from longattn.kernels import causal_halves

    monkeypatch.setattr(causal_halves, "HALVES_MIN_BLOCK", 8)  # the real threshold is 900
    calls = []
    real = causal_halves.causal_halves_window
    monkeypatch.setattr(causal_halves, "causal_halves_window", lambda *a, **k: calls.append(k) or real(*a, **k))
    g = torch.Generator().manual_seed(6)
    q = torch.randn(batch, 4, q_len, 16, generator=g) * 2
    k, v = (torch.randn(batch, 2, kv_len, 16, generator=g) * 2 for _ in range(2))
    padding = None
    if padded:
        padding = torch.ones(batch, kv_len, dtype=torch.bool)
        padding[1, :37] = False
    mask = AttentionMask.causal(q_len, kv_len, batch_size=batch, padding=padding)
    reference = type(method)(**{**method.params(), "backend": "math"})
    with torch.no_grad():
        got = method.attend(q, k, v, mask, AttendCall(scale=0.25))
        ref = reference.attend(q, k, v, mask, AttendCall(scale=0.25))
    assert calls, "the causal-halves path was not taken"
    if isinstance(method, SinkWindow) and kv_len == q_len:
        assert any(c["sinks"] is not None for c in calls) and any(c["sinks"] is None for c in calls)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_causal_halves_query_ranges():
    """Which query blocks the causal halves cover: whole halves inside the keys, the block starting at key 0,
    and whether the sinks can lead the previous half (it starts after them)."""
    from longattn.kernels.causal_halves import halves_query_ranges

    assert halves_query_ranges(700, 700, 0, 100, sinks_end=4) == [(0, 99, True), (99, 198, False), (198, 693, True)]
    assert halves_query_ranges(700, 700, 0, 100, sinks_end=0) == [(0, 693, True)]
    assert halves_query_ranges(300, 1000, 700, 100, sinks_end=4) == [(0, 297, True)]
    assert halves_query_ranges(350, 400, 50, 100, sinks_end=4) == [(99, 297, True)]  # block 0 would start before key 0
    assert halves_query_ranges(350, 400, 50, 100, sinks_end=60) == [(99, 198, False), (198, 297, True)]
    assert halves_query_ranges(350, 400, -99, 100) == [(99, 297, True)]  # keys start after query 99
    assert halves_query_ranges(50, 50, 0, 100) == [] and halves_query_ranges(9, 9, 0, 1) == []


@pytest.mark.parametrize("method", [SlidingWindow(window=5, backend="sdpa"),
                                    SinkWindow(sink_tokens=2, window=4, backend="sdpa")], ids=repr)
def test_restricted_mask_is_built_once_per_forward_not_per_layer(method, monkeypatch):
    calls = []
    real = AttentionMask.materialize
    monkeypatch.setattr(AttentionMask, "materialize", lambda self: calls.append(1) or real(self))
    model = make_model("llama")  # 3 layers share one mask per forward pass
    ids, mask = left_padded_batch()
    with torch.no_grad(), longattn.patched(model, method):
        model(input_ids=ids, attention_mask=mask)
    assert len(calls) == 1


@pytest.mark.parametrize("name,params", [("sliding_window", {}), ("sink_window", {"sink_tokens": 4}),
                                         ("dilated", {"dilation": 3})])
def test_target_density_sets_the_smallest_window_that_reaches_it(name, params):
    from longattn.kernels.masks import AttentionMask
    from longattn.methods import make_method

    length = 777
    mask = AttentionMask.causal(length)
    top = 1 / params.get("dilation", 1)  # a dilated window reaches at most 1 / dilation of the pairs
    for density in [d for d in (0.05, 0.3, 0.9, 1.0) if d <= top]:
        method = make_method(name, density=density, density_length=length, **params)
        reached = method.computed_pairs(mask) / mask.causal_pair_count()
        smaller = make_method(name, window=method.window - 1, **params) if method.window > 1 else None
        assert reached >= density
        assert smaller is None or smaller.computed_pairs(mask) / mask.causal_pair_count() < density
    if top < 1:
        with pytest.raises(ValueError, match="cannot be reached"):
            make_method(name, density=0.9, density_length=length, **params)
    with pytest.raises(ValueError, match="not both"):
        make_method(name, window=7, density=0.5, density_length=100, **params)
    with pytest.raises(ValueError, match=r"'density' must be a number in \(0, 1\]"):
        make_method(name, density=0.0, density_length=100, **params)
    with pytest.raises(ValueError, match="'density_length' must be an integer >= 1"):
        make_method(name, density=0.5, **params)
