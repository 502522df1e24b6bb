"""Pass-key generator and sliding-window perplexity against explicit computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from longattn.evals import generate_answers, make_passkey_sample, score_answers, sliding_window_perplexity
from conftest import make_model

def test_passkey_bad_input(small_tokenizer):
    with pytest.raises(ValueError, match="depth in"):
        make_passkey_sample(small_tokenizer, 500, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        make_passkey_sample(small_tokenizer, 10, 0.5, seed=0)
    with pytest.raises(ValueError, match="filler text 'text' has"):
        make_passkey_sample(small_tokenizer, 500, 0.5, seed=0, filler_text="too short")


def test_generate_and_score_pipeline(small_tokenizer):
    """A stand-in model that always emits one fixed number: right exactly when that number is the key, and
    generate_answers hands each prompt's own continuation to the scorer (left padding, batching)."""
    samples = [make_passkey_sample(small_tokenizer, n, d, seed=i) for i, (n, d) in
               enumerate(((200, 0.1), (180, 0.5), (200, 0.9)))]
    digits = small_tokenizer(" " + samples[1].answers[0], add_special_tokens=False)["input_ids"]

    class Emit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
            assert attention_mask[:, -1].all()  # left padding: every prompt ends at the last column
            tail = torch.tensor(digits + [0] * (max_new_tokens - len(digits)))
            from types import SimpleNamespace
            return SimpleNamespace(sequences=torch.cat([input_ids, tail.expand(input_ids.shape[0], -1)], 1),
                                   cache=None)

    stats = {}
    answers = generate_answers(Emit(), small_tokenizer, samples, batch_size=2, stats=stats)
    assert [s["first_number_match"] for s in score_answers(samples, answers)] == [0.0, 1.0, 0.0]
    assert stats["prompt_tokens"] == 580 and stats["kv_cache_bytes"] == 0


def explicit_perplexity(model, ids, context, stride):
    """Each token t >= 1 scored once, conditioned on ids[max(0, window start) : t] (written the slow way)."""
    nll, n, scored = 0.0, 0, set()
    begin = 0
    while True:
        end = min(begin + context, len(ids))
        logp = F.log_softmax(model(input_ids=ids[begin:end][None]).logits[0].float(), -1)
        for t in range(begin + 1, end):
            if t not in scored:
                scored.add(t)
                nll -= logp[t - begin - 1, ids[t]].item()
                n += 1
        if end == len(ids):
            break
        begin += stride
    return math.exp(nll / n), n


# Non-overlapping windows cannot score the first token of each window (it has no context there): 52 - 3.
@pytest.mark.parametrize("context, stride, scored", [(16, 16, 49), (16, 5, 52), (64, 64, 52)])
def test_sliding_window_perplexity_matches_explicit(context, stride, scored):
    model = make_model("llama")
    ids = torch.randint(3, 96, (53,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_ppl, ref_n = explicit_perplexity(model, ids, context, stride)
        got = sliding_window_perplexity(model, ids, context, stride)
    assert got.tokens == ref_n == scored
    assert got.perplexity == pytest.approx(ref_ppl, rel=1e-5)


def test_perplexity_bad_arguments():
    model = make_model("llama")
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, torch.arange(10), 8, 9)
