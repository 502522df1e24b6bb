"""SSA (arXiv:2411.12892): identity at initialisation, trainable parameters only, an explicit formula after
random perturbation (kernel and model level), decode equals prefill, save -> load -> identical logits."""
import math

import pytest
import torch

import longattn
from longattn.kernels import AttentionMask
from longattn.methods import AttendCall, SelectiveAttention
from longattn.methods.ssa import SelectiveTemperature
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def perturb(model, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ssa_temperature." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def ref_ssa(q, k, v, q_pre, allowed, scale, u, a, w, q_offset=0):
    """Plain loops: q_i <- q_i * (1 + a_h log(p + 1)) * (1 + tanh(u_h . q_pre_i)), v_j <- v_j (1 + tanh(w_g . v_j))."""
    u, a, w = u.detach(), a.detach(), w.detach()
    b, hq, s_q, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, s_q, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            g = h // group
            vs = [v[bi, g, j].double() * (1 + math.tanh(float(w[g].double() @ v[bi, g, j].double())))
                  for j in range(k.shape[2])]
            for i in range(s_q):
                t = (1 + float(a[h]) * math.log(i + q_offset + 1)) * (1 + math.tanh(float(u[h].double() @ q_pre[bi, h, i].double())))
                keys = [j for j in range(k.shape[2]) if allowed[bi, 0, i, j]]
                if not keys:
                    continue
                s = torch.stack([q[bi, h, i].double() * t @ k[bi, g, j].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[bi, h, i] = sum(p[n] * vs[j] for n, j in enumerate(keys))
    return out


def test_kernel_equals_explicit_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 8, generator=g) for h in (4, 2, 2))
    q_pre = torch.randn(2, 4, 11, 8, generator=g)
    temp = SelectiveTemperature(4, 2, 8)
    with torch.no_grad():
        for p in temp.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    temp.pre_rope_query = q_pre.transpose(1, 2).reshape(2, 11, 32)
    mod = torch.nn.Module()
    mod.ssa_temperature = temp
    pad = torch.ones(2, 11, dtype=torch.bool)
    pad[0, :2] = False
    mask = AttentionMask.causal(11, batch_size=2, padding=pad)
    got = SelectiveAttention(backend="math").attend(q, k, v, mask, AttendCall(scale=0.3, module=mod))
    allowed = mask.materialize()
    ref = ref_ssa(q, k, v, q_pre, allowed, 0.3, temp.query_weight, temp.position_weight, temp.value_weight)
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got.double() * rows, ref * rows, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_identity_at_init_and_removal(arch):
    model = make_model(arch)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        longattn.add_selective_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    perturb(model)
    with torch.no_grad():
        changed = model(input_ids=ids, attention_mask=mask).logits
    assert (changed[real] - ref[real]).abs().max() > 1e-2
    longattn.remove_selective_attention(model)
    assert not any("ssa_temperature" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        back = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(back, ref, atol=1e-6, rtol=0)


def test_model_layers_equal_explicit_formula_and_decode_equals_prefill(monkeypatch):
    """Every layer's attention output equals the explicit formula, with the pre-RoPE query recomputed
    independently as q_proj(hidden_states); then token-by-token decoding equals one prefill pass."""
    import importlib

    ssa_mod = importlib.import_module("longattn.methods.ssa")
    model = make_model("qwen2")  # GQA: 4 query heads, 2 KV heads
    longattn.add_selective_attention(model)
    perturb(model, seed=1)
    ids, mask = left_padded_batch()
    hidden = {}
    for m in longattn.patching.attention_modules(model):
        m.register_forward_pre_hook(lambda mod, a, kw: hidden.__setitem__(mod.layer_idx, kw["hidden_states"]),
                                    with_kwargs=True)
    errors = []
    original = ssa_mod.SelectiveAttention.attend

    def checked(self, query, key, value, m, call):
        out = original(self, query, key, value, m, call)
        mod = call.module
        b, s = hidden[mod.layer_idx].shape[:2]
        q_pre = mod.q_proj(hidden[mod.layer_idx]).view(b, s, 4, -1).transpose(1, 2)
        t = mod.ssa_temperature
        allowed = m.materialize()
        ref = ref_ssa(query, key, value, q_pre, allowed, call.scale, t.query_weight, t.position_weight,
                      t.value_weight, q_offset=m.q_offset)
        rows = allowed.any(-1, keepdim=True)
        errors.append(float(((out.double() - ref) * rows).abs().max()))
        return out

    monkeypatch.setattr(ssa_mod.SelectiveAttention, "attend", checked)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(errors) == 3 and max(errors) <= 1e-5, errors
    monkeypatch.setattr(ssa_mod.SelectiveAttention, "attend", original)
    assert_decode_matches_prefill(model, ids[:1], prefix=5)


def test_gradients_reach_only_the_new_parameters():
    model = make_model("llama")
    model.requires_grad_(False)
    longattn.add_selective_attention(model)
    model.train()
    ids, _ = left_padded_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if ".ssa_temperature." in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        longattn.selective_parameter_count(model)["new"]


def test_parameter_increase_on_reference_model():
    model, _ = longattn.reference_model()
    longattn.add_selective_attention(model)
    count = longattn.selective_parameter_count(model)
    # 4 layers x (4 query heads x 64 + 4 KV heads x 64 + 4 position weights) = 2064.
    assert count["new"] == 4 * (4 * 64 + 4 * 64 + 4) and count["base"] == 4_262_144
    assert count["fraction"] < 0.005


def test_save_load_round_trip(tmp_path):
    model = make_model("llama")
    longattn.add_selective_attention(model)
    perturb(model, seed=2)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    longattn.save_selective(model, tmp_path)
    loaded = longattn.load_selective(tmp_path)
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    plain = make_model("llama")
    with pytest.raises(ValueError, match="has no SSA parameters"):
        longattn.save_selective(plain, tmp_path / "x")
    with pytest.raises(ValueError, match="no SSA parameters; use"):
        longattn.patch(plain, "ssa")
        plain(input_ids=ids)
