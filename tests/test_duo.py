"""DuoAttention gates: the gated mix against explicit dense and sinks + window attention, its gate gradient, and
the gate search on the reference model (resume, the profile it writes, head_hybrid reading it, the CLI)."""
import pytest
import torch

import longattn
from longattn.duo import GatedHeads, GateTraining, plot_gate_history, train_head_gates
from longattn.heads import HeadProfile
from longattn.kernels.dense import dense_attention
from longattn.kernels.masks import AttentionMask
from longattn.methods import HeadHybrid
from longattn.methods.base import AttendCall
from test_head_hybrid import SINKS, WINDOW, allowed_per_head


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 6, 23, 16, generator=g) * 2).to(dtype)
    k, v = ((torch.randn(2, 3, 23, 16, generator=g) * 2).to(dtype) for _ in range(2))
    pad = torch.ones(2, 23, dtype=torch.bool)
    pad[1, :4] = False
    return q, k, v, pad


def _explicit(q, k, v, pad, gates):
    """gate * (dense over every causal real key) + (1 - gate) * (sinks + window), per KV head's query heads."""
    # sdpa: the math backend's softmax is float32 (as transformers' eager), too coarse for a float64 gradient check
    full = dense_attention(q, k, v, AttentionMask.from_tensor(allowed_per_head([0, 1, 2], 6, 3, pad)), scale=0.25,
                           backend="sdpa")
    stream = dense_attention(q, k, v, AttentionMask.from_tensor(allowed_per_head([], 6, 3, pad)), scale=0.25,
                             backend="sdpa")
    a = gates.repeat_interleave(2).view(1, 6, 1, 1).to(q.dtype)
    return a * full + (1 - a) * stream


@pytest.mark.parametrize("gates", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.3]])
def test_gated_mix_equals_explicit_attention(gates):
    q, k, v, pad = _inputs()
    gates = torch.tensor([gates])
    method = GatedHeads(gates=gates, layers=(0,), sink_tokens=SINKS, window=WINDOW)
    got = method.attend(q, k, v, AttentionMask.causal(23, batch_size=2, padding=pad), AttendCall(scale=0.25,
                                                                                                  layer_idx=0))
    rows = pad[:, None, :, None]
    torch.testing.assert_close(got * rows, _explicit(q, k, v, pad, gates[0]) * rows, atol=1e-5, rtol=0)
    if gates[0].tolist() == [1.0, 0.0, 0.0]:  # a head at 1 is full attention, at 0 sinks + window, exactly as
        hybrid = HeadHybrid(full_heads={0: [0]}, sink_tokens=SINKS, window=WINDOW)  # head_hybrid runs them
        want = hybrid.attend(q, k, v, AttentionMask.causal(23, batch_size=2, padding=pad),
                             AttendCall(scale=0.25, layer_idx=0))
        torch.testing.assert_close(got * rows, want * rows, atol=1e-6, rtol=0)


def test_gate_gradient_is_the_difference_of_the_two_attentions():
    """d<out, w>/d gate[h] = <full - stream, w> summed over h's query heads; q, k, v get gradients too."""
    q, k, v, pad = _inputs(torch.float64)
    q.requires_grad_(True)
    gates = torch.tensor([[0.2, 0.7, 0.5]], dtype=torch.float64, requires_grad=True)
    method = GatedHeads(gates=gates, layers=(4,), sink_tokens=SINKS, window=WINDOW)
    out = method.attend(q, k, v, AttentionMask.causal(23, batch_size=2, padding=pad), AttendCall(scale=0.25,
                                                                                                  layer_idx=4))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = w * pad[:, None, :, None]
    (out * w).sum().backward()
    diff = _explicit(q.detach(), k, v, pad, torch.ones(3)) - _explicit(q.detach(), k, v, pad, torch.zeros(3))
    want = (diff * w).sum((0, 2, 3)).view(3, 2).sum(-1)
    torch.testing.assert_close(gates.grad[0], want, atol=1e-9, rtol=1e-9)
    assert q.grad is not None and q.grad.abs().sum() > 0
    torch.autograd.gradcheck(lambda g: (GatedHeads(gates=g, layers=(4,), sink_tokens=SINKS, window=WINDOW).attend(
        q.detach(), k, v, AttentionMask.causal(23, batch_size=2, padding=pad), AttendCall(scale=0.25, layer_idx=4))
        * w).sum(), (gates.detach().clone().requires_grad_(True),))


def test_gated_heads_errors():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="gates"):
        GatedHeads(gates=torch.ones(2, 3), layers=(0,))
    method = GatedHeads(gates=torch.ones(1, 2), layers=(0,), window=WINDOW)
    with pytest.raises(ValueError, match="3 KV heads, 2 gates"):
        method.attend(q, k, v, AttentionMask.causal(23, batch_size=2), AttendCall(scale=0.25, layer_idx=0))
    with pytest.raises(ValueError, match="no gates for layer 5"):
        method.attend(q, k, v, AttentionMask.causal(23, batch_size=2), AttendCall(scale=0.25, layer_idx=5))


@pytest.fixture(scope="module")
def ref():
    return longattn.reference_model()


SMALL = dict(length=300, samples=2, window=32, lr=0.05)


def test_gate_search_resumes_and_feeds_head_hybrid(ref, tmp_path):
    model, tok = ref
    torch.manual_seed(0)
    whole = train_head_gates(model, tok, GateTraining(steps=4, **SMALL), progress=False)
    hist = whole.settings["history"]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert hist[0]["distill"] < 1e-10  # every gate starts at 1: the mixed model is the dense model
    assert hist[-1]["distill"] > 0 and hist[-1]["mean_gate"] < 1  # the L1 term has pulled the gates down
    gates = torch.tensor(whole.kv_scores["gate"])
    assert gates.shape == (len(whole.layers), whole.num_kv_heads) and bool(((gates >= 0) & (gates <= 1)).all())
    # query heads of one KV head share its gate
    g = whole.num_heads // whole.num_kv_heads
    assert all(row[i] == row[i - i % g] for row in whole.scores["gate"] for i in range(len(row)))
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags come back

    state = tmp_path / "state.pt"
    train_head_gates(model, tok, GateTraining(steps=2, **SMALL), state_path=state, save_every=1, progress=False)
    resumed = train_head_gates(model, tok, GateTraining(steps=4, **SMALL), state_path=state, progress=False)
    assert [h["step"] for h in resumed.settings["history"]] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(resumed.kv_scores["gate"]), gates, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="other settings"):
        train_head_gates(model, tok, GateTraining(steps=4, **{**SMALL, "lr": 0.01}), state_path=state,
                         progress=False)

    path = whole.save(tmp_path / "gates.json")
    hybrid = HeadHybrid(profile=str(path), score="gate", share=0.25)
    flat = sorted(((v, layer, h) for layer, row in zip(whole.layers, gates.tolist()) for h, v in enumerate(row)),
                  key=lambda t: (-t[0], t[1], t[2]))
    want = {}
    for _, layer, h in sorted(flat[:round(0.25 * len(flat))], key=lambda t: t[1:]):
        want.setdefault(layer, []).append(h)
    assert hybrid.full == want
    assert HeadProfile.load(path).settings["history"] == hist
    assert plot_gate_history(whole, tmp_path / "h.png").stat().st_size > 5000


def test_gate_search_refuses_what_it_cannot_train(ref):
    model, tok = ref
    with pytest.raises(ValueError, match="must exceed sink_tokens \\+ window"):
        train_head_gates(model, tok, GateTraining(length=100, window=128), progress=False)
    with pytest.raises(ValueError, match="unpatch the model first"):
        with longattn.patched(model, "dense"):
            train_head_gates(model, tok, GateTraining(**SMALL, steps=1), progress=False)
    with pytest.raises(ValueError, match="float32"):
        train_head_gates(model.to(torch.bfloat16), tok, GateTraining(**SMALL, steps=1), progress=False)
    model.float()


def test_gates_command(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "gates"
    args = [sys.executable, "-m", "longattn.cli", "gates", "--model", "reference", "--length", "300", "--samples",
            "1", "--window", "32", "--steps", "2", "--out-dir", str(out), "--threads", "1"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "highest gates (KV heads): L" in run.stdout
    assert (out / "gates_state.pt").exists() and (out / "gate_history.png").exists()
    assert HeadProfile.load(out / "gates.json").settings["steps"] == 2
    assert (out / "heads_gate_kv.png").exists()
    bad = subprocess.run(args[:-4] + ["--l1", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "l1" in bad.stderr
