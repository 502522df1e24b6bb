"""ACT (arXiv:2406.15765): equals an explicit reference (full attention map, sinks by column mean over the
queries that see each key, first token excluded, beta-scaling and proportional redistribution), per head,
with padding, query chunking and GQA; other heads are untouched; head selection runs."""
import pytest
import torch

import longattn
from longattn.kernels import AttentionMask
from longattn.methods import AttendCall, AttentionCalibration
from conftest import left_padded_batch, make_model


def ref_act(q, k, v, allowed, scale, heads, threshold, beta):
    b, hq, s_q, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, s_q, d, dtype=torch.float64)
    for bi in range(b):
        first = int(allowed[bi, 0].any(0).nonzero()[0])  # first real key of this sequence
        for h in range(hq):
            kh, vh = k[bi, h // group].double(), v[bi, h // group].double()
            a = torch.zeros(s_q, k.shape[2], dtype=torch.float64)
            for i in range(s_q):
                keys = allowed[bi, 0, i].nonzero().flatten()
                if len(keys):
                    a[i, keys] = torch.softmax(q[bi, h, i].double() @ kh[keys].T * scale, 0)
            if h in heads:
                seen = allowed[bi, 0].double().sum(0)
                mean = a.sum(0) / seen.clamp_min(1)
                sinks = [j for j in range(k.shape[2]) if mean[j] > threshold and j != first]
                for i in range(s_q):
                    sink_mass = sum(float(a[i, j]) for j in sinks)
                    rest = [j for j in range(k.shape[2]) if j not in sinks and allowed[bi, 0, i, j]]
                    rest_mass = sum(float(a[i, j]) for j in rest)
                    if rest_mass == 0:
                        continue
                    new = a[i].clone()
                    for j in sinks:
                        new[j] = a[i, j] * beta
                    for j in rest:
                        new[j] = a[i, j] + (1 - beta) * sink_mass * a[i, j] / rest_mass
                    a[i] = new
            out[bi, h] = a @ vh
    return out


@pytest.mark.parametrize("chunk", [3, 512])
def test_kernel_equals_reference_with_padding_and_gqa(chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 17, 8, generator=g) * 2 for h in (4, 2, 2))
    k[:, :, 5] *= 4  # a strong key: a hidden sink candidate
    pad = torch.ones(2, 17, dtype=torch.bool)
    pad[1, :4] = False
    mask = AttentionMask.causal(17, batch_size=2, padding=pad)
    spec = AttentionCalibration(threshold=0.08, beta=0.3, heads=[[0, 1], [0, 2], [1, 0]], query_chunk=chunk)
    got = spec.attend(q, k, v, mask, AttendCall(scale=0.35, layer_idx=0))
    allowed = mask.materialize()
    ref = ref_act(q, k, v, allowed, 0.35, {1, 2}, 0.08, 0.3)
    rows = allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got.double() * rows, ref * rows, atol=1e-5, rtol=0)
    plain = ref_act(q, k, v, allowed, 0.35, set(), 0.08, 0.3)
    assert ((ref - plain) * rows).abs()[:, [1, 2]].max() > 1e-3  # calibration really changed those heads


def test_patched_model_equals_reference_in_every_layer(monkeypatch):
    """Through patch (llama, left-padded batch): layer outputs equal the explicit reference."""
    import importlib

    act = importlib.import_module("longattn.methods.act")
    model = make_model("llama")
    ids, mask = left_padded_batch()
    spec = AttentionCalibration(threshold=0.1, beta=0.4)
    longattn.patch(model, spec)
    errors = []
    original = AttentionCalibration.attend

    def checked(self, query, key, value, m, call):
        out = original(self, query, key, value, m, call)
        allowed = m.materialize()
        ref = ref_act(query, key, value, allowed, call.scale, set(range(query.shape[1])), 0.1, 0.4)
        rows = allowed.any(-1, keepdim=True)
        errors.append(float(((out.double() - ref) * rows).abs().max()))
        return out

    monkeypatch.setattr(act.AttentionCalibration, "attend", checked)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(errors) == 3 and max(errors) <= 1e-5, errors


def test_beta_one_is_dense_and_head_selection():
    model = make_model("llama")
    ids, _ = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with longattn.patched(model, "act", beta=1.0):
            same = model(input_ids=ids).logits
    torch.testing.assert_close(same, ref, atol=1e-5, rtol=0)
    chosen = longattn.act_select_heads(model, ids, threshold=0.05, beta=0.4)
    assert chosen and all(0 <= lay < 3 and 0 <= h < 4 for lay, h in chosen)  # 6 of 12 heads here
    with torch.no_grad():
        base = float(model(input_ids=ids, labels=ids).loss)
        for lay, h in chosen:  # each kept head lowers the loss on its own
            with longattn.patched(model, "act", threshold=0.05, beta=0.4, heads=[[lay, h]], layers=[lay]):
                assert float(model(input_ids=ids, labels=ids).loss) < base


@pytest.mark.parametrize("params, message", [({"threshold": 0}, "'threshold' must be in \\(0, 1\\)"),
                                             ({"beta": 1.5}, "'beta' must be in \\[0, 1\\]"),
                                             ({"heads": [[0]]}, "'heads' must be None or a list of"),
                                             ({"query_chunk": 0}, "'query_chunk' must be an integer >= 1")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        AttentionCalibration(**params)
