"""The shared matrix every attention method and KV policy of the registries runs (cases in tests/registry.py):
patch / unpatch, padded batches, GQA, generate, decode = prefill where claimed, density, the explicit-mask
reference for positional patterns and their composition with a KV policy, and for policies the budget and
padded-equals-alone."""
from pathlib import Path

import pytest
import torch

import longattn
from longattn.kvcache import POLICIES, CompressedLayer
from longattn.methods import METHODS, make_method
from conftest import eager_logits_with_allowed, left_padded_batch, make_model
from registry import METHOD_CASES, POLICY_CASES

ROOT = Path(__file__).resolve().parent.parent


def test_every_method_and_policy_has_a_case():
    assert set(METHOD_CASES) == set(METHODS), "add the new method to tests/registry.py"
    assert set(POLICY_CASES) == set(POLICIES), "add the new policy to tests/registry.py"
    for name, case in METHOD_CASES.items():
        assert case.reference is None or (ROOT / case.reference).is_file(), name


def _patched_model(name, arch="llama"):
    case = METHOD_CASES[name]
    model = make_model(arch)
    if case.setup:
        getattr(longattn, case.setup)(model)
    return model, case


@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_method_matrix(name):
    model, case = _patched_model(name)
    ids, mask = left_padded_batch()
    # Positions as generate() gives them: each row counts from its first real token (methods that route by the
    # rotated vectors, such as routing, depend on absolute RoPE positions).
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    state = longattn.patch(model, name, **case.params)
    assert state.method.name == name
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert torch.isfinite(got[real]).all()
    density = state.meter.density("prefill")
    assert density is not None and 0 < density <= 1
    if case.rows_independent:  # a left-padded row gives what it gives alone (GQA: the model has 4 query / 2 KV heads)
        with torch.no_grad():
            alone = model(input_ids=ids[1:, real[1]]).logits
        torch.testing.assert_close(got[1, real[1]], alone[0], atol=1e-5, rtol=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)
    if case.decode_equals_prefill:
        one = ids[:1]
        with torch.no_grad():
            whole = model(input_ids=one, use_cache=False).logits
            cache, steps = None, []
            for t in range(one.shape[1]):
                o = model(input_ids=one[:, t:t + 1], cache=cache, use_cache=True)
                cache = o.past_key_values
                steps.append(o.logits)
        torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)
    longattn.unpatch(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(after, before)  # unpatched: bit-identical
    with pytest.raises(ValueError, match=name):
        longattn.patch(model, name, bogus_parameter=1)


POSITIONAL = [n for n in sorted(METHOD_CASES) if METHOD_CASES[n].reference is None]


@pytest.mark.parametrize("name", POSITIONAL)
def test_positional_method_equals_its_explicit_mask(name):
    """A method whose pattern is positional equals the model's eager attention with that pattern as a mask."""
    model, case = _patched_model(name)
    ids, mask = left_padded_batch()
    spec = make_method(name, **case.params)
    first = mask.argmax(-1)  # each row's first real token
    pattern = spec.position_pattern(first)

    def allowed_for(module, query, key):
        b = torch.arange(query.shape[0]).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long)
        q = torch.arange(key.shape[2] - query.shape[2], key.shape[2]).view(1, 1, -1, 1)
        k = torch.arange(key.shape[2]).view(1, 1, 1, -1)
        allowed = pattern(b, h, q, k) & (k <= q) & mask.bool().view(mask.shape[0], 1, 1, -1)
        return allowed.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])

    ref = eager_logits_with_allowed(model, ids, mask, allowed_for)
    longattn.patch(model, name, **case.params)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", POSITIONAL)
def test_positional_method_composes_with_a_kv_policy(name, monkeypatch):
    """Decoding over a compressed cache, the method attends exactly to the kept keys its pattern allows."""
    case = METHOD_CASES[name]
    model, _ = _patched_model(name)
    longattn.patch(model, name, kv_cache={"policy": "knorm", "kv_budget": 12}, **case.params)
    pattern = make_method(name, **case.params).position_pattern(None)
    seen, original = [], CompressedLayer.attend

    def spy(self, query, *args, **kwargs):
        out = original(self, query, *args, **kwargs)
        seen.append((self.token_index[:, :, -1:], self.token_index, self.valid, out[1]))
        return out

    monkeypatch.setattr(CompressedLayer, "attend", spy)
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(9))
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(seen) == 3 * 3  # every layer of every decoding step (the first new token comes from the prefill)
    zero, excluded = torch.zeros((), dtype=torch.long), 0
    for q_tok, tok, valid, allowed in seen:  # allowed: [B, query heads, 1, kept]; 2 query heads per KV head
        expect = valid & (tok <= q_tok) & pattern(zero, zero, q_tok, tok)
        if allowed is None:  # no mask: every kept key
            assert torch.equal(expect, valid & (tok <= q_tok)), name
        else:
            assert torch.equal(allowed[:, ::2, 0], expect), name
        excluded += int((valid & ~expect).sum())
    assert (excluded == 0) == (name == "dense"), name  # the pattern drops kept keys: the check can fail


@pytest.mark.parametrize("name", sorted(POLICY_CASES))
def test_policy_matrix(name):
    budget = 10
    model = make_model("llama")
    ids, mask = left_padded_batch()
    state = longattn.patch(model, name, kv_budget=budget, **POLICY_CASES[name])
    assert state.kv_policy.name == name
    seen = []

    policy = state.kv_policy

    def record(module, args, kwargs, output):
        cache = output.past_key_values
        assert isinstance(cache, longattn.CompressedCache)
        for i in range(3):  # what each layer holds, as the policy counts it, against that layer's share
            layer = cache.layers[i]
            seen.append(policy.held(layer.keys.shape[-2], layer.valid) - policy.layer_share(budget, i, 3))

    handle = model.register_forward_hook(record, with_kwargs=True)
    together = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    handle.remove()
    assert seen and max(seen) <= 0  # every layer, after every forward
    for row in range(2):
        real = mask[row].bool()
        alone = model.generate(ids[row:row + 1, real], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert together[row, -4:].tolist() == alone[0, -4:].tolist(), row
    longattn.unpatch(model)
    with pytest.raises(ValueError, match=name):
        longattn.patch(model, name, kv_budget=budget, bogus_parameter=1)
