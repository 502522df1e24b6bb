"""KV policies where attention sees a per-head view of the cached entries, not the entries themselves.

Multi-head latent attention (DeepSeek-V2/V3 style) caches one shared latent and RoPE key per token: entries are
scored with the per-head keys the model expands from them, pooled over heads, and evicted as latents; DeepSeek
Sparse Attention adds an indexer key per entry; JetMoE tiles its KV heads once per expert. Checked against explicit
references: decoding over the kept entries equals the unpatched model run over the whole text with each layer's
last query masked to the kept tokens; the kept set is the best by explicitly computed head-averaged scores;
StreamingLLM turns the cached RoPE key (both rotary layouts); indexer keys follow their entries.
"""
import pytest
import torch
from conftest import kept_by_layer, masked_reference_logits
from transformers import DynamicCache

import longattn
from longattn.kvcache import CompressedCache
from longattn.models.tiny import tiny_model

PROMPT, BUDGET = 20, 9


def model_for(arch):
    model = tiny_model(arch).eval()
    with torch.no_grad():  # sharper attention, so that scores differ between entries
        for name, p in model.named_parameters():
            if ("q_b_proj" in name or "kv_b_proj" in name or "q_proj" in name) and p.ndim == 2:
                p.mul_(3.0)
    return model


def batch(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, min(vocab, 100), (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
@pytest.mark.parametrize("policy,params", [("snapkv", dict(window=3, kernel_size=3)), ("h2o", {}), ("knorm", {}),
                                           ("tova", {}), ("adakv", dict(window=3))])
def test_decoding_over_kept_latents_equals_masked_reference(arch, policy, params):
    model = model_for(arch)
    ids, mask = batch(model.config.vocab_size)
    longattn.patch(model, policy, kv_budget=BUDGET, **params)
    cache = CompressedCache(model._longattn.kv_policy, model)
    nxt = torch.tensor([[7], [9]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        layers = sorted(i for i, layer in enumerate(cache.layers) if hasattr(layer, "token_index"))
        kept = kept_by_layer(cache, layers)
        assert all(cache.layers[i].keys.shape[1] == 1 for i in layers)  # one latent "head"
        assert all(len(k[0]) <= BUDGET for per in kept.values() for k in per)
        assert all(min(kept[i][1][0]) >= 4 for i in layers)  # pads never kept
        got = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                    cache=cache, use_cache=True).logits[:, -1]
    longattn.unpatch(model)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    ref = masked_reference_logits(model, torch.cat([ids, nxt], 1), mask2, kept)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_tiled_kv_heads_keep_the_same_entries_and_decode_as_the_masked_reference():
    model = tiny_model("jetmoe")
    ids, mask = batch(model.config.vocab_size)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    longattn.patch(model, "h2o", kv_budget=BUDGET)
    cache = CompressedCache(model._longattn.kv_policy, model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        layers = [i for i, layer in enumerate(cache.layers) if hasattr(layer, "token_index")]
        kept = kept_by_layer(cache, layers)
        assert all(cache.layers[i].keys.shape[1] == 2 for i in layers)  # two KV heads, tiled x2 by the model
        assert all(per_head[0] == per_head[1] and len(per_head[0]) == BUDGET for i in layers for per_head in kept[i])
        got = model(input_ids=torch.tensor([[7], [9]]), attention_mask=mask2, cache=cache, use_cache=True).logits[:, -1]
    longattn.unpatch(model)
    ref = masked_reference_logits(model, torch.cat([ids, torch.tensor([[7], [9]])], 1), mask2, kept)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_knorm_pools_the_per_head_key_norms_of_each_latent():
    model = model_for("deepseek_v3")
    ids, mask = batch(model.config.vocab_size)
    longattn.patch(model, "knorm", kv_budget=BUDGET)
    cache = CompressedCache(model._longattn.kv_policy, model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    longattn.unpatch(model)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=plain, use_cache=True)
    attn = model.model.layers[0].self_attn
    latents, rope_keys = plain.layers[0].keys, plain.layers[0].values
    with torch.no_grad():
        keys, _ = attn.expand_kv(latents, rope_keys)  # [B, heads, N, D]: the keys attention really uses
    for b in range(2):
        scores = [-sum(float(keys[b, h, j].double().norm()) for h in range(keys.shape[1])) for j in range(PROMPT)]
        real = [j for j in range(PROMPT) if mask[b, j]]
        expected = sorted(sorted(real, key=lambda j: -scores[j])[:BUDGET])
        assert cache.kept_positions(0)[b, 0].tolist() == expected


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])  # RoPE as halves / as interleaved pairs
def test_streaming_llm_turns_the_cached_rope_key_to_cache_positions(arch):
    model = model_for(arch)
    ids = torch.randint(3, 90, (1, 24), generator=torch.Generator().manual_seed(8))
    longattn.patch(model, "streaming_llm", sink_tokens=2, window=6)
    cache = CompressedCache(model._longattn.kv_policy, model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    longattn.unpatch(model)
    kept = cache.kept_positions(0)[0, 0]
    assert kept.tolist() == [0, 1, 18, 19, 20, 21, 22, 23]

    def fresh(tokens, first_position):
        plain = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=tokens, position_ids=torch.arange(first_position, first_position + tokens.shape[1])[None],
                  cache=plain, use_cache=True)
        return plain.layers[0]

    # 16 tokens evicted: the sinks' RoPE keys move to sit right before the window (positions 16..23); the
    # latents carry no position and stay as they were.
    layer = fresh(ids[:, kept], 16)
    assert torch.allclose(cache.layers[0].values, layer.values, atol=1e-5)
    assert torch.allclose(cache.layers[0].keys, layer.keys, atol=1e-6)
    unshifted = fresh(ids[:, kept], 0).values
    assert not torch.allclose(cache.layers[0].values[..., :2, :], unshifted[..., :2, :], atol=1e-3)


def test_indexer_keys_are_evicted_with_their_entries_and_its_choice_is_honoured(monkeypatch):
    """DeepSeek Sparse Attention (DeepSeek-V3.2): the indexer caches one key per entry; after eviction it must hold
    exactly the kept tokens' indexer keys, and decoding attends only to kept entries the indexer chose."""
    from longattn.kvcache.cache import CompressedIndexedLayer, CompressedLayer

    model = model_for("deepseek_v32")
    ids, mask = batch(model.config.vocab_size)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=plain, use_cache=True)
    longattn.patch(model, "snapkv", kv_budget=BUDGET, window=3, kernel_size=3)
    cache = CompressedCache(model._longattn.kv_policy, model)
    seen = []
    attend = CompressedLayer.attend

    def spy(self, query, pattern, scale, softcap, sliding_window, learned_sinks=None, selected=None):
        out = attend(self, query, pattern, scale, softcap, sliding_window, learned_sinks, selected)
        seen.append((self.valid.clone(), selected, out[1]))
        return out

    monkeypatch.setattr(CompressedLayer, "attend", spy)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, CompressedIndexedLayer)
            kept = cache.kept_positions(i)[:, 0]  # [B, M]
            at_kept = kept.unsqueeze(-1).expand(-1, -1, layer.indexer_keys.shape[-1])
            expected = plain.layers[i].indexer_keys.gather(1, at_kept)
            assert torch.equal(layer.indexer_keys, expected)
            assert torch.equal(layer.keys, plain.layers[i].keys.gather(2, kept[:, None, :, None].expand_as(layer.keys)))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        model(input_ids=torch.tensor([[7], [9]]), attention_mask=mask2, cache=cache, use_cache=True)
    longattn.unpatch(model)
    assert len(seen) == len(cache.layers)
    for valid, selected, allowed in seen:
        assert selected is not None and not bool(selected.all())  # top-8 of 10 entries: the indexer drops some
        assert torch.equal(allowed[:, 0, -1], valid[:, 0] & selected[:, -1])


def test_layers_reusing_an_indexer_top_k_keep_their_leaders_entries():
    """HY-V4 / GLM-5 "shared" indexer layers reuse the top-k of the last layer that ran its own indexer: their
    indices name that layer's entries, so under eviction they must keep exactly the same tokens."""
    from longattn.models import shared_indexer_layers

    model = model_for("hy_v4")
    leaders = shared_indexer_layers(model)
    assert leaders  # the tiny model has a shared layer
    ids, mask = batch(model.config.vocab_size)
    longattn.patch(model, "knorm", kv_budget=BUDGET)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    longattn.unpatch(model)
    cache = out.past_key_values
    for follower, leader in leaders.items():
        assert torch.equal(cache.kept_positions(follower), cache.kept_positions(leader))
        assert cache.layers[follower].keys.shape[-2] == BUDGET
    own = [i for i in range(len(cache.layers)) if i not in leaders]
    assert any(not torch.equal(cache.kept_positions(own[0]), cache.kept_positions(i)) for i in own[1:])
