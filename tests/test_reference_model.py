"""The shipped reference model: loads offline, is plain multi-head, and really retrieves across its context
(while a short sliding window does not). Also runs the demo, the README's main job, end to end."""
import pytest
import torch

import longattn
from longattn.evals import generate_answers, make_task, score_answers


@pytest.fixture(scope="module")
def reference():
    return longattn.reference_model()


def test_loads_offline_as_standard_hf_folder(reference):
    model, tok = reference
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads == cfg.num_attention_heads  # plain MHA, so that GQA conversion can be shown
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 25e6
    assert tok("The pass key is 12345.")["input_ids"][-6:-1] == [tok.convert_tokens_to_ids(d) for d in "12345"]
    size = sum(f.stat().st_size for f in longattn.reference_model_path().iterdir())
    assert size <= 25 * 2**20


def _passkey_accuracy(model, tok, length, n=6):
    samples = [make_task("passkey").make(tok, length, seed=100 + i, depth=i / (n - 1)) for i in range(n)]
    answers = generate_answers(model, tok, samples, batch_size=n)
    return sum(s["first_number_match"] for s in score_answers(samples, answers)) / n


def test_dense_retrieves_and_a_short_window_does_not(reference):
    model, tok = reference
    with torch.no_grad():
        dense = _passkey_accuracy(model, tok, 2048)
        with longattn.patched(model, "sliding_window", window=256):
            windowed = _passkey_accuracy(model, tok, 2048)
    assert dense >= 5 / 6
    assert windowed <= 2 / 6


def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from longattn import cli

    monkeypatch.setitem(cli.DEMO_SWEEP, "lengths", [512, 1024])
    assert cli.main(["demo", "--model", "reference", "--samples", "2", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| passkey | 1024 | dense |" in out and "sliding_window(window=256)" in out
    # The story: perplexity per configuration, and each prompt's needle depth found or missed.
    assert "Perplexity (every token scored once" in out and "0.00:found" in out and "1.00:" in out
    assert (tmp_path / "score_vs_density.png").stat().st_size > 1000
    assert (tmp_path / "report.md").exists()
