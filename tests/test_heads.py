"""Head profiles: scores on constructed attention patterns with known answers, against explicit attention
matrices of a real model (eager, output_attentions), and the profile file / plots."""
import math

import pytest
import torch

import longattn
from longattn.heads import HeadObserver, HeadProfile, attention_map, plot_attention_map, plot_profile, profile_heads
from longattn.kernels.masks import AttentionMask
from longattn.methods.base import AttendCall


def _constructed(S=48, D=64):
    """Four heads with known behaviour: 0 uniform, 1 on the first token, 2 on itself, 3 on token 20."""
    q = torch.zeros(1, 4, S, D)
    k = torch.zeros(1, 4, S, D)
    big = 40.0
    k[0, 1, 0, 0] = big; q[0, 1, :, 0] = big                     # everything on key 0
    for i in range(S):                                          # each query on its own key
        k[0, 2, i, i % D] = big; q[0, 2, i, i % D] = big
    k[0, 3, 20, 1] = 2 * big; q[0, 3, :, 1] = big                # on key 20 once it is visible
    k[0, 3, :20, 0] = big; q[0, 3, :, 0] = big                   # before that, on keys 0..19 evenly
    return q, k


def test_scores_of_constructed_patterns():
    S, sinks, window = 48, 2, 8
    q, k = _constructed(S)
    obs = HeadObserver(sink_tokens=sinks, window=window, query_chunk=7)  # chunks that do not divide S
    obs._observe(q, k, AttentionMask.causal(S), AttendCall(scale=1.0, layer_idx=0))
    sums = obs.sums[0]
    counted = torch.arange(S) >= sinks + window
    n = int(counted.sum())
    assert sums.queries == n
    sink = (sums.sink / n).tolist()
    local = (sums.local / n).tolist()
    entropy = (sums.entropy / n).tolist()
    # head 0, uniform: sink mass = sinks / (i + 1) averaged over counted queries i, entropy exactly 1
    expect = sum(sinks / (i + 1) for i in range(S) if counted[i]) / n
    assert sink[0] == pytest.approx(expect, abs=1e-6) and entropy[0] == pytest.approx(1.0, abs=1e-6)
    assert local[0] == pytest.approx(sum(window / (i + 1) for i in range(S) if counted[i]) / n, abs=1e-6)
    assert sink[1] == pytest.approx(1.0, abs=1e-6) and entropy[1] == pytest.approx(0.0, abs=1e-5)
    prof = HeadProfile("t", [0], 4, 4, {"sink": [sink], "local": [local]}, {})
    assert prof.scores["distant"][0] == pytest.approx([1 - s - l for s, l in zip(sink, local)])
    assert prof.scores["distant"][0][2] == pytest.approx(0.0, abs=1e-6)  # a head on itself loses nothing
    assert local[2] == pytest.approx(1.0, abs=1e-6) and sink[2] == pytest.approx(0.0, abs=1e-6)
    # head 3: key 20 takes everything from query 20 on; it is seen by S - 20 >= window queries
    assert float(sums.non_first[3]) == pytest.approx(1.0, abs=1e-6)
    assert float(sums.non_first[1]) < 0.05 and float(sums.non_first[2]) < 0.2
    assert [int(t) for t in sums.last_argmax[0]][1:] == [0, S - 1, 20]


@pytest.fixture(scope="module")
def ref():
    return longattn.reference_model()


def test_profile_equals_explicit_attention_matrices(ref):
    """Prefill scores from transformers' eager attention probabilities (output_attentions), retrieval from the
    argmax of each generated step's attention row, against profile_heads."""
    from longattn.evals.tasks import make_task
    from longattn.evals.tasks.base import Filler

    model, tok = ref
    length, sinks, window = 400, 4, 64
    prof = profile_heads(model, tok, length=length, samples=1, tasks=("passkey",), sink_tokens=sinks,
                         window=window, progress=False)
    s = make_task("passkey").make(tok, length, seed=0, filler=Filler(), depth=0.5)
    ids = torch.tensor([s.input_ids])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens,
                                 do_sample=False, output_attentions=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
    finally:
        model.set_attn_implementation("sdpa")
    prefill = out.attentions[0]  # per layer [1, H, S, S]
    pos = torch.arange(length)
    counted = pos >= sinks + window
    for layer, a in enumerate(prefill):
        a = a[0].double()[:, counted]  # [H, n, S]
        qp = pos[counted]
        local = (pos[None] > qp[:, None] - window) & (pos[None] >= sinks)
        seen = pos[None] <= qp[:, None]
        ent = -(a * a.clamp_min(1e-30).log()).sum(-1) / seen.sum(-1).double().log()
        torch.testing.assert_close(torch.tensor(prof.scores["sink"][layer]), a[..., :sinks].sum(-1).mean(-1),
                                   atol=1e-5, rtol=0, check_dtype=False)
        torch.testing.assert_close(torch.tensor(prof.scores["local"][layer]), (a * local).sum(-1).mean(-1),
                                   atol=1e-5, rtol=0, check_dtype=False)
        torch.testing.assert_close(torch.tensor(prof.scores["entropy"][layer]), ent.mean(-1), atol=1e-5, rtol=0,
                                   check_dtype=False)
    new = out.sequences[0, length:].tolist()
    start, n = s.meta["needle_spans"][0]
    needle = {}
    for p in range(start, start + n):
        needle.setdefault(s.input_ids[p], set()).add(p)
    steps = [i for i, t in enumerate(new) if t in needle]
    assert steps, "the reference model should copy the pass key"
    for layer in range(len(prefill)):
        hits = torch.zeros(prefill[layer].shape[1])
        for i in steps:
            row = out.attentions[i][layer][0, :, -1]  # [H, keys]: the query that produced token i
            hits += torch.tensor([float(int(row[h].argmax()) in needle[new[i]]) for h in range(row.shape[0])])
        assert prof.scores["retrieval"][layer] == pytest.approx((hits / len(steps)).tolist(), abs=1e-6)
    assert prof.settings["needle_tokens_generated"] == len(steps)
    assert max(max(r) for r in prof.scores["retrieval"]) > 0.5  # this model has retrieval heads (layer 2)


def test_profile_file_choice_and_plots(ref, tmp_path):
    model, tok = ref
    prof = profile_heads(model, tok, length=300, samples=2, window=32, progress=False)
    path = prof.save(tmp_path / "profile.json")
    back = HeadProfile.load(path)
    assert back == prof
    chosen = back.top_kv_heads("retrieval", share=0.25)
    flat = [(v, layer, h) for layer, row in zip(back.layers, back.kv_scores["retrieval"]) for h, v in enumerate(row)]
    assert sum(map(len, chosen.values())) == 4 == round(0.25 * len(flat))
    best = max(flat)
    assert best[2] in chosen[best[1]]
    with pytest.raises(ValueError, match="unknown score"):
        back.top_kv_heads("magic")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a head profile"):
        HeadProfile.load(tmp_path / "bad.json")
    pngs = plot_profile(back, tmp_path / "png")
    assert len(pngs) == 6 and all(p.stat().st_size > 5000 for p in pngs)


def test_attention_map_block_means(ref, tmp_path):
    model, tok = ref
    ids = torch.randint(0, len(tok), (1, 200))
    amap = attention_map(model, ids, layer=1, head=2, block=32)
    assert amap.shape == (7, 7)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            a = model(input_ids=ids, output_attentions=True).attentions[1][0, 2].double()
    finally:
        model.set_attn_implementation("sdpa")
    causal = torch.ones(200, 200).tril().bool()
    for bi in range(7):
        for bj in range(7):
            blk = a[bi * 32:(bi + 1) * 32, bj * 32:(bj + 1) * 32]
            ok = causal[bi * 32:(bi + 1) * 32, bj * 32:(bj + 1) * 32]
            want = blk[ok].mean() if ok.any() else torch.tensor(0.0)
            assert float(amap[bi, bj]) == pytest.approx(float(want), abs=1e-6)
    png = plot_attention_map(amap, tmp_path / "map.png", "reference layer 1 head 2", 32, {"sinks": 0, "needle": 100})
    assert png.stat().st_size > 5000
    with pytest.raises(ValueError, match="head 9 out of range"):
        attention_map(model, ids, layer=1, head=9)


def test_inspect_command(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "heads"
    run = subprocess.run([sys.executable, "-m", "longattn.cli", "inspect", "--model", "reference", "--length", "300",
                          "--samples", "1", "--window", "32", "--maps", "2", "--map-block", "16", "--out-dir",
                          str(out), "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "top retrieval: L2." in run.stdout  # the reference model's retrieval heads sit in layer 2
    prof = HeadProfile.load(out / "profile.json")
    assert prof.settings["length"] == 300 and len(prof.scores["sink"]) == 4
    assert len(list(out.glob("heads_*.png"))) == 12 and len(list(out.glob("map_L*_H*.png"))) == 2
    bad = subprocess.run([sys.executable, "-m", "longattn.cli", "inspect", "--tasks", "needles"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown task 'needles'" in bad.stderr
