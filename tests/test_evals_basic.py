"""Pass-key generator and sliding-window perplexity against explicit computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from longattn.evals import make_passkey_sample, score_passkey, sliding_window_perplexity
from longattn.evals.passkey import NEEDLE, PREAMBLE, QUESTION
from conftest import make_model

PROSE = " ".join(f"Sentence number {i} talks about attention, memory and time." for i in range(400))


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("filler", [None, PROSE], ids=["grass", "prose"])
@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_length_depth_and_needle(small_tokenizer, filler, length, depth):
    s = make_passkey_sample(small_tokenizer, length, depth, seed=7, filler_text=filler)
    assert len(s.input_ids) == length  # exact length control
    needle = small_tokenizer(NEEDLE.format(key=s.answer), add_special_tokens=False)["input_ids"]
    assert s.input_ids[s.needle_start:s.needle_start + s.needle_len] == needle  # the needle really is there
    head, question = n_tokens(small_tokenizer, PREAMBLE), n_tokens(small_tokenizer, QUESTION)
    n_filler = length - head - len(needle) - question
    assert s.needle_start - head == round(depth * n_filler)  # ... at the stated depth of the filler
    assert s.input_ids[-question:] == small_tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert len(s.answer) == 5 and s.answer.isdigit()


def test_passkey_seeds_reproduce_and_differ(small_tokenizer):
    a = make_passkey_sample(small_tokenizer, 500, 0.5, seed=3, filler_text=PROSE)
    b = make_passkey_sample(small_tokenizer, 500, 0.5, seed=3, filler_text=PROSE)
    c = make_passkey_sample(small_tokenizer, 500, 0.5, seed=4, filler_text=PROSE)
    assert a == b and a.input_ids != c.input_ids


def test_passkey_bad_input(small_tokenizer):
    with pytest.raises(ValueError, match="depth must be in"):
        make_passkey_sample(small_tokenizer, 500, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        make_passkey_sample(small_tokenizer, 10, 0.5, seed=0)
    with pytest.raises(ValueError, match="filler text has"):
        make_passkey_sample(small_tokenizer, 500, 0.5, seed=0, filler_text="too short")


def test_score_passkey_counts_exact_answers(small_tokenizer):
    """A stand-in model that always emits a fixed number: right exactly when that number is the key."""
    samples = [make_passkey_sample(small_tokenizer, 200, d, seed=i) for i, d in enumerate((0.1, 0.5, 0.9))]
    digits = small_tokenizer(" " + samples[1].answer, add_special_tokens=False)["input_ids"]

    class Emit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, max_new_tokens, **kw):
            tail = torch.tensor(digits + [0] * (max_new_tokens - len(digits)))
            return torch.cat([input_ids, tail.expand(input_ids.shape[0], -1)], 1)

    assert score_passkey(Emit(), small_tokenizer, samples, batch_size=2) == [False, True, False]


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
