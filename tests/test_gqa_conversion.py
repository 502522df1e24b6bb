"""Grouped-query conversion: pooled weights are the group means, g = heads changes nothing, the converted
model runs (generate included) and survives save/load."""
import pytest
import torch

import longattn
from conftest import left_padded_batch, make_model


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "olmo2", "mistral"])
def test_identity_when_keeping_all_heads(arch):
    model = make_model(arch, num_key_value_heads=4)
    ids, mask = left_padded_batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    longattn.convert_to_gqa(model, 4)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "olmo2"])
@pytest.mark.parametrize("g", [2, 1])
def test_pooled_weights_are_group_means_and_model_runs(arch, g, tmp_path):
    model = make_model(arch, num_key_value_heads=4)
    attn = longattn.patching.attention_modules(model)[0]
    d = attn.head_dim
    if arch == "phi3":
        w = attn.qkv_proj.weight.detach().clone()
        k_before = w[4 * d:8 * d]
    else:
        k_before = attn.k_proj.weight.detach().clone()
    longattn.convert_to_gqa(model, g)
    attn = longattn.patching.attention_modules(model)[0]
    k_after = attn.qkv_proj.weight[4 * d:4 * d + g * d] if arch == "phi3" else attn.k_proj.weight
    per_group = 4 // g
    for j in range(g):
        expected = k_before.view(4, d, -1)[j * per_group:(j + 1) * per_group].mean(0)
        torch.testing.assert_close(k_after.view(g, d, -1)[j], expected)
    assert model.config.num_key_value_heads == g
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_key_value_heads == g
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, logits)


def test_kv_bytes_shrink_with_the_heads():
    model = make_model("llama", num_key_value_heads=4)
    before = longattn.kv_cache_bytes_per_token(model.config)
    longattn.convert_to_gqa(model, 1)
    assert longattn.kv_cache_bytes_per_token(model.config) * 4 == before == 2 * 3 * 4 * 16 * 4


def test_bad_group_count():
    model = make_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match="positive divisor of the model's 4 key/value heads"):
        longattn.convert_to_gqa(model, 3)
    with pytest.raises(ValueError, match="positive divisor"):
        longattn.convert_to_gqa(model, 0)
