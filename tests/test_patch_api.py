"""The public patch API: per-layer control, recipes, patching twice, dtypes, and clear errors on bad input."""
import pytest
import torch
from torch import nn

import longattn
from longattn.methods.dense import Dense
from conftest import left_padded_batch, make_model


def count_attend_calls(monkeypatch):
    calls = []
    original = Dense.attend

    def counting(self, q, k, v, mask, call):
        calls.append(call.layer_idx)
        return original(self, q, k, v, mask, call)

    monkeypatch.setattr(Dense, "attend", counting)
    return calls


def test_patch_routes_every_layer_and_unpatch_routes_none(monkeypatch):
    calls = count_attend_calls(monkeypatch)
    model = make_model("llama")
    ids, mask = left_padded_batch()
    state = longattn.patch(model, "dense")
    assert state is longattn.patch_state(model) and repr(state).startswith("PatchState(Dense(")  # not the model
    assert len(repr(state)) < 300
    assert model.config._attn_implementation == "longattn"
    model(input_ids=ids, attention_mask=mask)
    assert calls == [0, 1, 2]
    longattn.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    model(input_ids=ids, attention_mask=mask)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("layers, expected", [("1:", [1, 2]), ([0, -1], [0, 2]), (2, [2]), ("all", [0, 1, 2])])
def test_per_layer_control(monkeypatch, layers, expected):
    calls = count_attend_calls(monkeypatch)
    model = make_model("mistral")
    ids, mask = left_padded_batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    longattn.patch(model, "dense", layers=layers)
    got = model(input_ids=ids, attention_mask=mask).logits
    assert calls == expected
    assert longattn.patch_state(model).layers == tuple(expected)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_spec_object_recipe_name_and_recipe_path(tmp_path):
    model = make_model("qwen3")
    longattn.patch(model, Dense(backend="math"))
    assert longattn.patch_state(model).method == Dense(backend="math")
    longattn.patch(model, "dense")  # the shipped recipe shares the method's name; method wins, same result
    assert longattn.patch_state(model).method == Dense()
    recipe = tmp_path / "mine.toml"
    recipe.write_text('method = "dense"\nlayers = "1:"\n[params]\nbackend = "math"\n')
    longattn.patch(model, recipe)
    state = longattn.patch_state(model)
    assert state.method == Dense(backend="math") and state.layers == (1, 2)
    longattn.patch(model, str(recipe), backend="sdpa")  # keyword parameters override the recipe's
    assert longattn.patch_state(model).method == Dense(backend="sdpa")


def test_patching_twice_replaces_the_first_cleanly():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    longattn.patch(model, "dense", backend="math", layers=[0])
    longattn.patch(model, "dense", backend="sdpa", layers=[1, 2])
    state = longattn.patch_state(model)
    assert state.original_impl == "sdpa" and state.layers == (1, 2) and state.method.backend == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, "_longattn_method")
    longattn.unpatch(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert longattn.unpatch(model) is None  # unpatching an unpatched model is harmless


def test_patched_context_manager_restores_even_on_error():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with longattn.patched(model, "dense"):
            assert model.config._attn_implementation == "longattn"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa" and longattn.patch_state(model) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_unpatched(dtype):
    model = make_model("qwen2").to(dtype)
    ids, mask = left_padded_batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    with longattn.patched(model, "dense"):
        got = model(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == dtype
    real = mask.bool()
    torch.testing.assert_close(got[real].float(), ref[real].float(), atol=2e-2, rtol=0)


def test_gradients_through_patched_model_match_unpatched():
    model = make_model("llama").train()
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    with longattn.patched(model, "dense", backend="math"):
        got = grads()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match=r"unknown attention method or recipe 'nope'; methods: \[.*'dense'.*recipes: \["):
        longattn.patch(make_model("llama"), "nope")


def test_bad_parameter_names_parameter_and_allowed_values():
    with pytest.raises(ValueError, match=r"dense: parameter 'backend' must be one of \['auto', 'sdpa'"):
        longattn.patch(make_model("llama"), "dense", backend="fast")
    with pytest.raises(ValueError, match=r"dense: unknown parameter\(s\) \['window'\]"):
        longattn.patch(make_model("llama"), "dense", window=4)


def test_bad_layers():
    with pytest.raises(ValueError, match=r"layers: index 7 out of range for a model with 3 layers"):
        longattn.patch(make_model("llama"), "dense", layers=[7])
    with pytest.raises(ValueError, match="layers: expected"):
        longattn.patch(make_model("llama"), "dense", layers="first two")


def test_non_hf_module_is_a_type_error():
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel.*got Linear"):
        longattn.patch(nn.Linear(4, 4), "dense")


def test_unsupported_models_name_the_class():
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=50))
    with pytest.raises(longattn.UnsupportedModelError,
                       match="cannot patch BertForMaskedLM: its self-attention modules do not declare is_causal=True"):
        longattn.patch(bert, "dense")
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=32, num_layers=1, num_heads=2, vocab_size=50,
                                             d_kv=16))
    with pytest.raises(longattn.UnsupportedModelError, match="T5ForConditionalGeneration: it is an encoder-decoder"):
        longattn.patch(t5, "dense")


def test_malformed_recipes(tmp_path):
    model = make_model("llama")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = \n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        longattn.patch(model, bad)
    bad.write_text('method = "dense"\nwindow = 3\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown field\(s\) \['window'\]"):
        longattn.patch(model, bad)
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        longattn.patch(model, tmp_path / "missing.toml")


def test_methods_listing():
    infos = {m.name: m for m in longattn.methods()}
    assert infos["dense"].params == {"backend": "auto"}
    assert "arXiv:1706.03762" in infos["dense"].paper
    assert "dense" in longattn.recipe_names()


def test_cli_help_and_methods(capsys):
    from longattn.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "backend='auto'" in out
    edits = out.index("Model edits")  # SSA adds parameters: listed apart from the methods, with the call that adds them
    assert out.index("\nssa ") > edits > out.index("\nsink_window ")
    assert "added by: longattn.add_selective_attention(model)" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "methods" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", longattn.recipe_names())
def test_every_shipped_recipe_patches_a_model(recipe):
    """Paper configurations are sized for long inputs (LongLoRA's groups of 2048, Quest's 64 pages of 16)."""
    model = make_model("llama", max_position_embeddings=8192)
    ids = torch.randint(3, 96, (1, 4096), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad(), longattn.patched(model, recipe):
        state = longattn.patch_state(model)
        assert state.method.name == longattn.load_recipe(
            __import__("longattn.recipes", fromlist=["x"]).recipe_paths()[recipe]).method
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out[mask.bool()]).all()
