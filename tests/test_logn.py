"""Log-n scaling: unchanged within the training length; beyond it, logits scaled by log(p+1)/log(L)."""
import math

import pytest
import torch

import longattn
from longattn.kernels import AttentionMask
from longattn.methods import AttendCall, LogNScaling
from conftest import assert_decode_matches_prefill, left_padded_batch, make_model


def test_identity_within_training_length():
    model = make_model("llama")  # max_position_embeddings 256 > the 24-token test sequences
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with longattn.patched(model, "logn"):
            got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_beyond_training_length_scales_logits_explicitly():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 8, generator=g) for h in (4, 2, 2))
    got = LogNScaling(training_length=10, scale=1.2).attend(q, k, v, AttentionMask.causal(40), AttendCall(scale=0.3))
    kk, vv = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    scores = q.double() @ kk.transpose(-1, -2) * 0.3
    factor = torch.tensor([max(1.0, 1.2 * math.log(p + 1) / math.log(10)) for p in range(40)]).view(1, 1, -1, 1)
    scores = (scores * factor).masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(scores, -1) @ vv
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


def test_decode_equals_prefill_beyond_training_length():
    model = make_model("qwen3")
    ids, _ = left_padded_batch()
    longattn.patch(model, "logn", training_length=8)
    assert_decode_matches_prefill(model, ids[:1])


@pytest.mark.parametrize("params, message", [({"training_length": 1}, "'training_length' must be None or an"),
                                             ({"scale": 0}, "'scale' must be > 0")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        LogNScaling(**params)


@pytest.mark.parametrize("factor", [None, 2.0])
def test_yarn_temperature_scales_logits_explicitly(factor):
    from longattn.methods import YarnTemperature

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=g) for _ in range(3))
    got = YarnTemperature(training_length=10, factor=factor).attend(q, k, v, AttentionMask.causal(30),
                                                                     AttendCall(scale=0.3))
    s = [factor if factor is not None else max(1.0, (p + 1) / 10) for p in range(30)]
    mult = torch.tensor([(0.1 * math.log(x) + 1) ** 2 for x in s]).view(1, 1, -1, 1)
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.3 * mult).masked_fill(
        ~torch.ones(30, 30, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(got.double(), torch.softmax(scores, -1) @ v.double(), atol=1e-5, rtol=0)


def test_yarn_dynamic_is_identity_within_training_length_and_decodes_consistently():
    model = make_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with longattn.patched(model, "yarn_temperature"):
            got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    longattn.patch(model, "yarn_temperature", training_length=8)
    assert_decode_matches_prefill(model, ids[:1])
    with pytest.raises(ValueError, match="'factor' must be None or >= 1"):
        longattn.patch(model, "yarn_temperature", factor=0.5)
