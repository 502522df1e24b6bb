"""Hybrid models (softmax attention beside SSM / linear attention): KV policies compress the attention entries of
transformers' own hybrid cache layers and leave their conv / recurrent state exactly as the unpatched model's;
attention modules shared by several layers (Zamba, Zamba2) are patched and compressed at every layer that calls
them. References: the unpatched model with each layer's last query masked to the kept tokens, the unpatched
cache's linear-attention state, and the four compatibility checks on a Zamba2 with two shared-attention layers."""
import pytest
import torch
from conftest import kept_by_layer, masked_reference_logits
from transformers import DynamicCache

import longattn
from longattn.kvcache import CompressedCache
from longattn.kvcache.cache import CompressedHybridLayer, CompressedLayer
from longattn.models import attention_layer_indices
from longattn.models.compat import check_dense, check_generate, check_kv_budget, check_window, padded_batch
from longattn.models.tiny import tiny_model

BUDGET = 9


def linear_states(cache):
    return {(i, kind, s): t.clone() for i, layer in enumerate(cache.layers)
            for kind in ("conv_states", "recurrent_states") for s, t in getattr(layer, kind, {}).items()
            if t is not None}


@pytest.mark.parametrize("arch", ["falcon_h1", "zaya", "granitemoehybrid"])  # attention beside SSM in a layer; apart
def test_attention_entries_compressed_linear_state_untouched(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, length=20, pad=4)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=plain, use_cache=True)
    longattn.patch(model, "snapkv", kv_budget=BUDGET, window=3, kernel_size=3)
    cache = CompressedCache(model._longattn.kv_policy, model)
    nxt = torch.tensor([[7], [9]])
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        layers = attention_layer_indices(model)
        assert layers and all(isinstance(cache.layers[i], CompressedLayer) for i in layers)
        assert all(isinstance(cache.layers[i], CompressedHybridLayer) == (arch != "granitemoehybrid") for i in layers)
        assert all(cache.layers[i].keys.shape[-2] == BUDGET for i in layers)
        expected = linear_states(plain)
        assert expected and expected.keys() == linear_states(cache).keys()
        assert all(torch.equal(expected[k], t) for k, t in linear_states(cache).items())
        kept = kept_by_layer(cache, layers)
        got = model(input_ids=nxt, attention_mask=mask2, cache=cache, use_cache=True).logits[:, -1]
    longattn.unpatch(model)
    ref = masked_reference_logits(model, torch.cat([ids, nxt], 1), mask2, kept)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_shared_attention_blocks_pass_every_check_at_every_layer():
    # Zamba2 with two hybrid layers calling its shared attention block (the tiny default has one).
    def build():
        return tiny_model("zamba2", num_hidden_layers=4, hybrid_layer_ids=[1, 3],
                          layer_types=["linear_attention", "hybrid", "linear_attention", "hybrid"])

    assert attention_layer_indices(build()) == (1, 3)
    ids, mask = padded_batch(128)
    for check in (check_dense, check_window, check_generate, check_kv_budget):
        assert check(build(), ids, mask) == "pass", check.__name__
    model = build()
    with pytest.raises(longattn.UnsupportedModelError, match="shared by its layers"):
        longattn.patch(model, "sink_window", sink_tokens=2, window=4, layers=[1])
    with pytest.raises(longattn.UnsupportedModelError, match="attends differently per layer"):
        longattn.patch(model, "routing", density=0.5)


def test_layers_sharing_keys_and_values_see_what_their_source_kept(monkeypatch):
    """Gemma 3n KV sharing: "reuse" layers attend over the keys and values of the last "store" layer of their type;
    with a compressed cache they must see exactly its kept entries, at their stream positions."""
    from longattn.kvcache.cache import Entries
    from longattn.models import kv_source_layers

    # A sliding window shorter than the prompt: the reusing sliding layer must measure it in stream positions.
    model = tiny_model("gemma3n_text", sliding_window=6)
    sources = kv_source_layers(model)
    assert sources  # the tiny model has reuse layers
    ids, mask = padded_batch(model.config.vocab_size, length=20, pad=4)
    nxt, mask2 = torch.tensor([[7], [9]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    longattn.patch(model, "snapkv", kv_budget=BUDGET, window=3, kernel_size=3)
    cache = CompressedCache(model._longattn.kv_policy, model)
    calls = []
    attend = Entries.attend

    def spy(self, query, *args, **kwargs):
        calls.append(query.shape)
        return attend(self, query, *args, **kwargs)

    monkeypatch.setattr(Entries, "attend", spy)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        own = [i for i in attention_layer_indices(model) if i not in sources]
        kept = kept_by_layer(cache, own)
        kept.update({i: kept[s] for i, s in sources.items()})
        calls.clear()
        got = model(input_ids=nxt, attention_mask=mask2, cache=cache, use_cache=True).logits[:, -1]
    longattn.unpatch(model)
    assert len(calls) == len(own) + len(sources)  # every layer, reusing ones included, attended by stream index
    ref = masked_reference_logits(model, torch.cat([ids, nxt], 1), mask2, kept)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_a_models_own_cache_class_keeps_its_state_and_compresses_attention():
    """MiniMax builds a DynamicCache subclass of its own (lightning-attention state beside the attention layers):
    the compressed cache is of that class, keeps that state as the unpatched model does, and compresses only the
    softmax-attention layers."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    model = tiny_model("minimax")
    ids, mask = padded_batch(model.config.vocab_size, length=20, pad=4)
    nxt, mask2 = torch.tensor([[7], [9]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    plain = MiniMaxCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=plain, use_cache=True)
    longattn.patch(model, "snapkv", kv_budget=BUDGET, window=3, kernel_size=3)
    cache = CompressedCache(model._longattn.kv_policy, model)
    assert isinstance(cache, MiniMaxCache)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        layers = attention_layer_indices(model)
        assert all(isinstance(cache.layers[i], CompressedLayer) and cache.layers[i].keys.shape[-2] == BUDGET
                   for i in layers)
        lightning = [i for i, state in enumerate(plain.linear_cache) if isinstance(state, torch.Tensor)]
        assert lightning and all(torch.equal(plain.linear_cache[i], cache.linear_cache[i]) for i in lightning)
        kept = kept_by_layer(cache, layers)
        got = model(input_ids=nxt, attention_mask=mask2, cache=cache, use_cache=True).logits[:, -1]
    longattn.unpatch(model)
    ref = masked_reference_logits(model, torch.cat([ids, nxt], 1), mask2, kept)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
