"""`patch(model, "dense")` equals unpatched transformers on every tested architecture."""
import pytest
import torch

import longattn
from conftest import left_padded_batch, make_model


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def greedy(model, ids, mask, n=8):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_dense_logits_match_and_unpatch_restores(arch, backend):
    model = make_model(arch)
    ids, mask = left_padded_batch()
    ref = logits(model, ids, mask)
    longattn.patch(model, "dense", backend=backend)
    if backend == "sdpa" and model.config.attn_logit_softcapping if arch == "gemma2" else False:
        with pytest.raises(ValueError, match="cannot apply logit soft-capping"):
            logits(model, ids, mask)  # an explicit sdpa request must not silently drop Gemma2's soft-capping
        return
    got = logits(model, ids, mask)
    real = mask.bool()  # padded query rows carry no meaning in either implementation
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    longattn.unpatch(model)
    assert torch.equal(logits(model, ids, mask), ref)


def test_dense_generate_identical_tokens(arch):
    model = make_model(arch)
    ids, mask = left_padded_batch(seed=1)
    ref = greedy(model, ids, mask)
    with longattn.patched(model, "dense"):
        got = greedy(model, ids, mask)
    assert torch.equal(got, ref)
