"""Architecture knowledge (longattn/models): true layer indices of hybrid models, learned sinks, refusals."""
import pytest
import torch

import longattn
from longattn.kernels.dense import dense_attention
from longattn.kernels.gathered import local_attention
from longattn.kernels.masks import AttentionMask, sinks_and_window
from longattn.models import attention_modules, num_layers
from longattn.models.compat import padded_batch
from longattn.models.tiny import tiny_model


def explicit_with_sinks(q, k, v, allowed, scale, sinks):
    """softmax over [allowed scores, one sink logit per head], the sink's value zero: plain loops of tensors."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    sink = sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return (p @ v.double()).float()


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_dense_learned_sinks_equal_explicit_softmax(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    sinks = torch.randn(4, generator=g) * 2
    allowed = torch.ones(9, 9, dtype=torch.bool).tril()
    got = dense_attention(q, k, v, AttentionMask.causal(9, batch_size=2), scale=0.3, backend=backend,
                          learned_sinks=sinks)
    torch.testing.assert_close(got, explicit_with_sinks(q, k, v, allowed, 0.3, sinks), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["gathered", "sdpa"])
def test_sink_window_with_learned_sinks_equals_explicit(backend):
    g = torch.Generator().manual_seed(1)
    n = 300
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    sinks = torch.randn(2, generator=g)
    pattern = AttentionMask.causal(n).restrict(sinks_and_window(3, 40))
    got = local_attention(q, k, v, pattern, span=40, sinks=3, backend=backend, scale=0.35, learned_sinks=sinks)
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    allowed = (j <= i) & ((i - j < 40) | (j < 3))
    torch.testing.assert_close(got, explicit_with_sinks(q, k, v, allowed, 0.35, sinks), atol=1e-5, rtol=0)


def test_hybrid_model_patches_its_attention_layers_by_their_own_index(monkeypatch):
    model = tiny_model("qwen3_next")  # layers 0-2 linear attention (gated delta net), layer 3 softmax attention
    assert [m.layer_idx for m in attention_modules(model)] == [3] and num_layers(model) == 4
    ids, mask = padded_batch(model.config.vocab_size)
    ref = model(input_ids=ids, attention_mask=mask).logits
    longattn.patch(model, "sink_window", sink_tokens=2, window=4, layers=[3])
    assert longattn.patch_state(model).layers == (3,)
    assert attention_modules(model)[0]._longattn_method is not None
    changed = model(input_ids=ids, attention_mask=mask).logits
    assert (changed - ref)[mask.bool()].abs().max() > 1e-3  # the attention layer really runs the method
    with pytest.raises(ValueError, match=r"layer 1 is not a softmax attention layer .*of which 1 are softmax "
                                         r"attention \(3\)"):
        longattn.patch(model, "dense", layers=[1])
    with pytest.raises(ValueError, match="selects no attention layer"):
        longattn.patch(model, "dense", layers=":3")
    longattn.unpatch(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_slice_out_of_range_is_an_error():
    model = tiny_model("llama")
    n = num_layers(model)
    with pytest.raises(ValueError, match="out of range"):
        longattn.patch(model, "dense", layers=f"{n + 5}:")


def test_kv_policy_keeps_the_hybrid_cache_layers():
    from transformers.cache_utils import LinearAttentionLayer

    from longattn.kvcache.cache import CompressedCache, CompressedLayer

    model = tiny_model("qwen3_next")
    ids, mask = padded_batch(model.config.vocab_size)
    longattn.patch(model, "snapkv", kv_budget=8, window=4, kernel_size=3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, CompressedCache)
    assert [type(layer) for layer in cache.layers[:3]] == [LinearAttentionLayer] * 3
    assert isinstance(cache.layers[3], CompressedLayer) and cache.attention_entry_counts() == [8]


def test_learned_sinks_refused_by_methods_that_do_not_implement_them():
    model = tiny_model("gpt_oss")
    ids, mask = padded_batch(model.config.vocab_size)
    longattn.patch(model, "block_topk", block_size=4, top_k=2)
    with pytest.raises(longattn.UnsupportedModelError, match=r"learned attention sinks \(s_aux\).*'block_topk'"):
        model(input_ids=ids, attention_mask=mask)


def test_streaming_llm_rotates_each_layer_with_its_own_rope_table():
    from longattn.models import rotary_inv_freq

    model = tiny_model("gemma3_text")
    types = model.config.layer_types
    full, local = types.index("full_attention"), types.index("sliding_attention")
    assert not torch.equal(rotary_inv_freq(model, full), rotary_inv_freq(model, local))
    ids, mask = padded_batch(model.config.vocab_size)
    longattn.patch(model, "streaming_llm", sink_tokens=2, kv_budget=10)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)
