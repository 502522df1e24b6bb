"""Sliding-window attention equals dense attention with the explicit windowed boolean mask."""
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask, dense_attention
from longattn.methods import AttendCall, SlidingWindow
from conftest import left_padded_batch, make_model


def explicit_window_mask(attention_mask: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, S, S] bool: causal, within `window`, and not a padded key (the slow, obvious way)."""
    b, s = attention_mask.shape
    allowed = torch.zeros(b, 1, s, s, dtype=torch.bool)
    for bi in range(b):
        for q in range(s):
            for k in range(s):
                allowed[bi, 0, q, k] = k <= q and q - k < window and bool(attention_mask[bi, k])
    return allowed


@pytest.mark.parametrize("backend", ["sdpa", "math", "flex"])
@pytest.mark.parametrize("window", [1, 4, 11])
def test_kernel_level_window_matches_explicit_mask(backend, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 23, 16, generator=g) * 2 for h in (4, 2, 2))
    pad = torch.ones(2, 23, dtype=torch.bool)
    pad[1, :4] = False
    allowed = explicit_window_mask(pad, window)
    ref = dense_attention(q, k, v, AttentionMask.from_tensor(allowed), scale=0.25, backend="math")
    got = SlidingWindow(window=window, backend=backend).attend(
        q, k, v, AttentionMask.causal(23, batch_size=2, padding=pad), AttendCall(scale=0.25))
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got * rows, ref * rows, atol=1e-5, rtol=0)


def test_model_logits_equal_explicit_4d_mask():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    explicit = explicit_window_mask(mask, 6)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=explicit).logits  # transformers' sdpa with our bool mask
        longattn.patch(model, "sliding_window", window=6)
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_window_intersects_the_models_own_window():
    model = make_model("mistral")  # its own sliding window is 8
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=explicit_window_mask(mask, 8)).logits
        longattn.patch(model, "sliding_window", window=20)  # wider than the model's: the model's 8 rules
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_decode_token_by_token_equals_prefill():
    model = make_model("qwen3")
    ids, _ = left_padded_batch()
    ids = ids[:1]
    longattn.patch(model, "sliding_window", window=5)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        from transformers import DynamicCache

        cache, steps = DynamicCache(config=model.config), []
        for t in range(ids.shape[1]):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


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
