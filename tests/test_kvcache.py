"""KV-cache compression: explicit expected cache contents for every policy (prefill and decoding), identity
when nothing is evicted, attention over the kept entries against an explicit per-head reference, StreamingLLM's
re-rotated positions, padding, bounded memory and errors."""
import math

import pytest
import torch
from conftest import left_padded_batch, make_model
from transformers import DynamicCache

import longattn
from longattn.kvcache import CompressedCache, CompressedLayer, make_policy

NEW_TOKENS = 6


@pytest.fixture
def recorder(monkeypatch):
    """Records, for every layer and forward, what the policy saw and which stream indices the layer kept."""
    records = []
    original = CompressedLayer.after_attention

    def spy(self, query, scale, softcap, learned_sinks=None):
        seen = dict(layer=self.layer_idx, keys=self.keys.clone(), tok=self.token_index.clone(),
                    valid=self.valid.clone(), query=query.clone(), scale=scale, prefill=self.prompt_length is None)
        original(self, query, scale, softcap, learned_sinks)
        seen["kept"] = [[sorted(t for t, v in zip(self.token_index[b, h].tolist(), self.valid[b, h].tolist()) if v)
                         for h in range(self.keys.shape[1])] for b in range(self.keys.shape[0])]
        records.append(seen)

    monkeypatch.setattr(CompressedLayer, "after_attention", spy)
    return records


def generate(model, policy, ids, mask=None, new=NEW_TOKENS, **params):
    longattn.patch(model, policy, **params)
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    finally:
        longattn.unpatch(model)
    return out


# ------------------------------------------------------------------------------- slow explicit references
def explicit_probs(rec, b, qh, rows):
    """Softmax attention of query head qh (rows = indices into this forward's queries) over the entries,
    one query at a time, causal by stream index, valid entries only: [len(rows), N]."""
    groups = rec["query"].shape[1] // rec["keys"].shape[1]
    kh = qh // groups
    q_tok = rec["tok"][b, 0, -rec["query"].shape[2]:]
    out = []
    for r in rows:
        logits = []
        for j in range(rec["keys"].shape[2]):
            ok = bool(rec["valid"][b, kh, j]) and int(rec["tok"][b, kh, j]) <= int(q_tok[r])
            dot = float(rec["query"][b, qh, r].double() @ rec["keys"][b, kh, j].double()) * rec["scale"]
            logits.append(dot if ok else -math.inf)
        out.append(torch.softmax(torch.tensor(logits, dtype=torch.float64), 0))
    return torch.stack(out)


def top_tokens(rec, b, h, scores, keep):
    """Stream indices of the `keep` best valid entries of head h (scores: list over entries)."""
    entries = [j for j in range(len(scores)) if rec["valid"][b, h, j]]
    best = sorted(entries, key=lambda j: -scores[j])[:keep]
    return sorted(int(rec["tok"][b, h, j]) for j in best)


def heads(rec):
    return range(rec["keys"].shape[1])


def group_heads(rec, h):
    groups = rec["query"].shape[1] // rec["keys"].shape[1]
    return range(h * groups, (h + 1) * groups)


# -------------------------------------------------------------------------------------------- contents
def test_streaming_llm_keeps_sinks_and_window(recorder):
    model = make_model("llama")
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(0))
    generate(model, "streaming_llm", ids, sink_tokens=3, window=8)
    for rec in recorder:
        newest = int(rec["tok"].max())
        expected = sorted({0, 1, 2} | set(range(newest - 7, newest + 1)))
        assert all(kept == expected for row in rec["kept"] for kept in row)
    assert len(recorder) == 3 * NEW_TOKENS  # every layer, every forward


def test_knorm_keeps_smallest_key_norms(recorder):
    model = make_model("qwen2")  # GQA: 4 query heads, 2 KV heads
    # Distinct tokens: RoPE keeps norms, so a repeated token would tie with itself in layer 0.
    ids = (torch.randperm(93, generator=torch.Generator().manual_seed(1))[:50] + 3).view(2, 25)
    generate(model, "knorm", ids, kv_budget=9)
    for rec in recorder:
        for b in range(2):
            for h in heads(rec):
                norms = [float(k.double().norm()) for k in rec["keys"][b, h]]
                assert rec["kept"][b][h] == top_tokens(rec, b, h, [-n for n in norms], 9)


def test_evict_every_amortises_decoding_and_never_exceeds_the_budget(recorder):
    model = make_model("qwen2")
    ids = (torch.randperm(93, generator=torch.Generator().manual_seed(1))[:50] + 3).view(2, 25)
    generate(model, "knorm", ids, new=12, kv_budget=9, evict_every=4)
    layer0 = [rec for rec in recorder if rec["layer"] == 0]
    held = [len(rec["kept"][0][0]) for rec in layer0]
    # prefill keeps the budget; decoding evicts to 9 - 4 + 1 = 6 when a step would exceed 9, i.e. every 4 steps
    assert held == [9, 6, 7, 8, 9, 6, 7, 8, 9, 6, 7, 8]
    for rec, n in zip(recorder, [len(r["kept"][0][0]) for r in recorder]):
        if rec["keys"].shape[2] > n:  # an eviction: the lowest key norms among the entries of that step
            for b in range(2):
                for h in heads(rec):
                    norms = [float(k.double().norm()) for k in rec["keys"][b, h]]
                    assert rec["kept"][b][h] == top_tokens(rec, b, h, [-x for x in norms], n)
    with pytest.raises(ValueError, match="evict_every"):
        make_policy("knorm", kv_budget=4, evict_every=5)


def test_tova_keeps_what_the_last_query_attends_to_head_averaged(recorder):
    model = make_model("qwen2")
    ids = torch.randint(3, 96, (1, 25), generator=torch.Generator().manual_seed(2))
    generate(model, "tova", ids, kv_budget=10)
    for rec in recorder:
        last = rec["query"].shape[2] - 1
        avg = sum(explicit_probs(rec, 0, qh, [last])[0] for qh in range(rec["query"].shape[1]))
        for h in heads(rec):
            assert rec["kept"][0][h] == top_tokens(rec, 0, h, avg.tolist(), 10)
        assert rec["kept"][0][0] == rec["kept"][0][1]  # one choice for the whole layer


def test_h2o_accumulates_attention_over_prefill_and_decoding(recorder):
    model = make_model("qwen2")
    ids = torch.randint(3, 96, (1, 25), generator=torch.Generator().manual_seed(3))
    budget, recent = 10, 4
    generate(model, "h2o", ids, kv_budget=budget, recent_window=recent)
    for layer in range(3):
        accumulated = {}  # (head, stream index) -> attention received so far
        for rec in [r for r in recorder if r["layer"] == layer]:
            for h in heads(rec):
                received = sum(explicit_probs(rec, 0, qh, range(rec["query"].shape[2])).sum(0)
                               for qh in group_heads(rec, h))
                for j, t in enumerate(rec["tok"][0, h].tolist()):
                    accumulated[h, t] = accumulated.get((h, t), 0.0) + float(received[j])
                newest = int(rec["tok"].max())
                scores = [math.inf if t > newest - recent else accumulated[h, t] for t in rec["tok"][0, h].tolist()]
                assert rec["kept"][0][h] == top_tokens(rec, 0, h, scores, budget)


def snapkv_votes(rec, b, h, queries, window, kernel):
    """SnapKV's votes for head h: attention of the observation queries summed, max-pooled over positions."""
    votes = sum(explicit_probs_of(rec, b, qh, queries).sum(0) for qh in group_heads(rec, h))
    n = len(votes)
    pooled = [max(votes[max(0, j - kernel // 2):j + kernel // 2 + 1]) for j in range(n)]
    newest = int(rec["tok"].max())
    return [math.inf if t > newest - window else float(pooled[j]) for j, t in enumerate(rec["tok"][b, h].tolist())]


def explicit_probs_of(rec, b, qh, queries):
    """Like explicit_probs, for explicit (query vectors [R, Hq, D], stream indices [R]) remembered queries."""
    vectors, toks = queries
    groups = rec["query"].shape[1] // rec["keys"].shape[1]
    kh = qh // groups
    out = []
    for r in range(len(toks)):
        logits = [float(vectors[r, qh].double() @ rec["keys"][b, kh, j].double()) * rec["scale"]
                  if rec["valid"][b, kh, j] and int(rec["tok"][b, kh, j]) <= toks[r] else -math.inf
                  for j in range(rec["keys"].shape[2])]
        out.append(torch.softmax(torch.tensor(logits, dtype=torch.float64), 0))
    return torch.stack(out)


def observation_windows(records, layer, window):
    """For each forward of `layer`: the last `window` queries seen so far (vectors [R, Hq, D], stream indices)."""
    vectors, toks, out = [], [], []
    for rec in [r for r in records if r["layer"] == layer]:
        q_tok = rec["tok"][0, 0, -rec["query"].shape[2]:].tolist()
        for r in range(rec["query"].shape[2]):
            vectors.append(rec["query"][0, :, r])
            toks.append(q_tok[r])
        out.append((rec, (torch.stack(vectors[-window:]), toks[-window:])))
    return out


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv"])
def test_snapkv_and_pyramidkv_vote_with_the_observation_window(recorder, policy):
    model = make_model("qwen2")
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(4))
    budget, window, kernel = 12, 4, 3
    generate(model, policy, ids, kv_budget=budget, window=window, kernel_size=kernel)
    spare = budget - window
    for layer in range(3):
        keep = budget
        if policy == "pyramidkv":  # 3 layers, beta 20: top = spare / 20, bottom = 2 spare - top
            low, high = spare / 20, 2 * spare - spare / 20
            keep = window + round(high - layer * (high - low) / 2)
        for rec, queries in observation_windows(recorder, layer, window):
            for h in heads(rec):
                scores = snapkv_votes(rec, 0, h, queries, window, kernel)
                assert rec["kept"][0][h] == top_tokens(rec, 0, h, scores, keep)
    if policy == "pyramidkv":
        sizes = [len(r["kept"][0][0]) for r in recorder[-3:]]
        assert sizes == [window + round(2 * spare - spare / 20 - i * (2 * spare - 2 * spare / 20) / 2)
                         for i in range(3)]
        assert sum(sizes) / 3 == pytest.approx(budget, abs=1)


def test_adakv_shares_the_layer_budget_across_heads(recorder):
    model = make_model("llama", num_key_value_heads=4)
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(5))
    budget, window, kernel, alpha = 8, 2, 3, 0.25
    generate(model, "adakv", ids, kv_budget=budget, window=window, kernel_size=kernel, alpha_safeguard=alpha)
    floor = int(alpha * budget)
    for layer in range(3):
        for rec, queries in observation_windows(recorder, layer, window):
            scores = {h: snapkv_votes(rec, 0, h, queries, window, kernel) for h in heads(rec)}
            chosen = set()
            for h in heads(rec):  # each head's own best first
                valid = [j for j in range(len(scores[h])) if rec["valid"][0, h, j]]
                chosen |= {(h, j) for j in sorted(valid, key=lambda j: -scores[h][j])[:floor]}
            rest = [(h, j) for h in heads(rec) for j in range(len(scores[h]))
                    if rec["valid"][0, h, j] and (h, j) not in chosen]
            n_rest = budget * len(heads(rec)) - len(chosen)
            chosen |= set(sorted(rest, key=lambda hj: -scores[hj[0]][hj[1]])[:n_rest])
            for h in heads(rec):
                assert rec["kept"][0][h] == sorted(int(rec["tok"][0, h, j]) for hh, j in chosen if hh == h)
            assert sum(len(k) for k in rec["kept"][0]) == budget * len(heads(rec))
    assert len({len(k) for r in recorder for k in r["kept"][0]}) > 1  # heads really hold different amounts


def test_compression_ratio_cuts_the_prompt_once(recorder):
    model = make_model("llama")
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(6))
    generate(model, "knorm", ids, compression_ratio=0.75)
    prefill = [r for r in recorder if r["prefill"]]
    assert {len(r["kept"][0][0]) for r in prefill} == {10}
    last = recorder[-1]
    assert len(last["kept"][0][0]) == 10 + NEW_TOKENS - 1  # decoding appends freely without kv_budget


# --------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("policy", ["streaming_llm", "h2o", "snapkv", "tova", "knorm", "pyramidkv", "adakv"])
def test_budget_above_length_gives_identical_logits(policy):
    # Llama (GQA, no sliding layers): transformers' DynamicCache holds the same tensors, so logits are equal
    # bit for bit. (With a model's own sliding-window layers transformers' cache drops the keys outside the
    # window, ours masks them: equal to ~1e-7, checked in the padding test below with Qwen2.)
    model = make_model("llama")
    ids, mask = left_padded_batch(length=20)
    longattn.patch(model, "dense")
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True, output_logits=True)
    longattn.unpatch(model)
    params = dict(sink_tokens=4, window=60) if policy == "streaming_llm" else dict(kv_budget=64)
    out = generate(model, policy, ids, mask, **params)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, out.logits))
    unpatched = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                               return_dict_in_generate=True, output_logits=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(unpatched.logits, out.logits))


def test_attention_over_kept_entries_matches_explicit_per_head_reference():
    model = make_model("llama")
    longattn.patch(model, "snapkv", kv_budget=9, window=3)
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(7))
    cache = CompressedCache(model._longattn.kv_policy, model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        layer = cache.layers[1]
        seen = {}
        original = CompressedLayer.attend

        def spy(self, query, pattern, scale, softcap, sliding_window, learned_sinks=None, selected=None):
            out = original(self, query, pattern, scale, softcap, sliding_window, learned_sinks, selected)
            if self.layer_idx == 1:
                seen.update(query=query, out=out[0], keys=self.keys, values=self.values, valid=self.valid,
                            scale=scale)
            return out

        CompressedLayer.attend = spy
        try:
            model(torch.tensor([[5], [6]]), cache=cache, use_cache=True)
        finally:
            CompressedLayer.attend = original
    assert layer.compressed
    for b in range(2):
        for qh in range(4):
            kh = qh // 2
            keep = [j for j in range(seen["keys"].shape[2]) if seen["valid"][b, kh, j]]
            k, v = seen["keys"][b, kh, keep].double(), seen["values"][b, kh, keep].double()
            probs = torch.softmax(k @ seen["query"][b, qh, 0].double() * seen["scale"], 0)
            assert torch.allclose(seen["out"][b, qh, 0].double(), probs @ v, atol=1e-6)
    longattn.unpatch(model)


def test_streaming_llm_rerotates_kept_keys_to_cache_positions():
    """Layer 0's keys depend only on the token and its position. StreamingLLM measures distances in the cache:
    after eviction the kept keys must equal the kept tokens encoded afresh at consecutive positions (the cache
    frame, up to one offset, which RoPE cannot see), with the newest token at its text position."""
    model = make_model("llama")
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(8))
    longattn.patch(model, "streaming_llm", sink_tokens=2, window=6)
    cache = CompressedCache(model._longattn.kv_policy, model)

    def fresh_keys(tokens, first_position):
        model_plain = DynamicCache(config=model.config)
        positions = torch.arange(first_position, first_position + tokens.shape[1])[None]
        model(tokens, position_ids=positions, cache=model_plain, use_cache=True)
        return model_plain.layers[0].keys

    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        kept = cache.kept_positions(0)[0, 0]
        assert kept.tolist() == [0, 1, 24, 25, 26, 27, 28, 29]
        longattn.unpatch(model)
        # 22 tokens evicted: the sinks move up to sit right before the window (positions 22..29).
        assert torch.allclose(cache.layers[0].keys, fresh_keys(ids[:, kept], 22), atol=1e-5)
        # The next token enters at its text position 30; then token 24 is evicted and the sinks move up one
        # more: tokens [0, 1, 25..29, new] at positions 23..30.
        longattn.patch(model, "streaming_llm", sink_tokens=2, window=6)
        model(torch.tensor([[7]]), cache=cache, use_cache=True)
        assert cache.kept_positions(0)[0, 0].tolist() == [0, 1, 25, 26, 27, 28, 29, 30]
        longattn.unpatch(model)
        tokens = torch.cat([ids[:, [0, 1, 25, 26, 27, 28, 29]], torch.tensor([[7]])], 1)
        assert torch.allclose(cache.layers[0].keys, fresh_keys(tokens, 23), atol=1e-5)
    # Without re-rotation the sinks keep their text positions 0 and 1.
    longattn.patch(model, "streaming_llm", sink_tokens=2, window=6, shift_positions=False)
    cache = CompressedCache(model._longattn.kv_policy, model)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        longattn.unpatch(model)
        expected = torch.cat([fresh_keys(ids[:, :2], 0), fresh_keys(ids[:, 24:], 24)], dim=2)
        assert torch.allclose(cache.layers[0].keys, expected, atol=1e-5)


@pytest.mark.parametrize("policy,params", [("streaming_llm", dict(sink_tokens=2, window=7)),
                                           ("h2o", dict(kv_budget=9)), ("snapkv", dict(kv_budget=9, window=3)),
                                           ("tova", dict(kv_budget=9)), ("knorm", dict(kv_budget=9))])
def test_left_padding_equals_each_row_alone(policy, params):
    model = make_model("qwen2")
    ids, mask = left_padded_batch(length=22, pad=6)
    batch = generate(model, policy, ids, mask, **params)
    alone = generate(model, policy, ids[1:, 6:], None, **params)
    assert torch.equal(batch.sequences[1, 22:], alone.sequences[0, 16:])
    for a, b in zip(batch.logits, alone.logits):
        assert torch.allclose(a[1], b[0], atol=1e-4)


def test_padding_is_never_kept_and_sinks_are_real_tokens(recorder):
    model = make_model("llama")
    ids, mask = left_padded_batch(length=22, pad=6)
    generate(model, "streaming_llm", ids, mask, sink_tokens=2, window=5)
    for rec in recorder:
        assert rec["kept"][1][0][:2] == [6, 7]
        assert all(t >= 6 for t in rec["kept"][1][0])


def test_decoding_memory_stays_within_budget():
    model = make_model("llama")
    longattn.patch(model, "h2o", kv_budget=16)
    cache = CompressedCache(model._longattn.kv_policy, model)
    token = torch.tensor([[5]])
    per_entry = 2 * 3 * 2 * 16 * 4  # keys+values, layers, KV heads, head dim, fp32 bytes
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 40)), cache=cache, use_cache=True)
        sizes = []
        for _ in range(60):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            sizes.append(cache.nbytes())
    assert max(sizes) == 16 * per_entry and min(sizes) == max(sizes)
    assert cache.get_seq_length() == 100
    longattn.unpatch(model)


def test_cache_hand_off_lives_only_during_a_forward():
    """Attention modules find their cache layer through the forward's hand-off, which a hook attaches and detaches
    when the forward ends, also when it raises: after generate nothing of the model holds the cache."""
    import gc
    import weakref

    from longattn.kvcache.handoff import HANDOFF_ATTR

    model = make_model("llama")
    longattn.patch(model, "h2o", kv_budget=8)
    attn = model.model.layers[1].self_attn
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, *_: seen.append(getattr(m, HANDOFF_ATTR, None)))
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    handle.remove()
    cache = out.past_key_values
    assert isinstance(cache, CompressedCache) and len(seen) == 3
    assert all(h is getattr(cache, HANDOFF_ATTR) for h in seen)  # every forward: this cache's hand-off
    assert cache.layers[1].keys.shape[-2] == 8  # ... and the layers evicted through it
    assert not any(hasattr(m, HANDOFF_ATTR) for m in model.modules())
    gone = weakref.ref(cache)
    del out, cache
    gc.collect()
    assert gone() is None

    def fail(*_):
        raise RuntimeError("stop in layer 2")

    handle = model.model.layers[2].self_attn.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="stop in layer 2"):
        model(input_ids=ids, cache=CompressedCache(model._longattn.kv_policy, model), use_cache=True)
    handle.remove()
    assert not any(hasattr(m, HANDOFF_ATTR) for m in model.modules())
    cache = CompressedCache(model._longattn.kv_policy, model)
    model(input_ids=ids, cache=cache, use_cache=True)
    assert all(layer.keys.shape[-2] == 8 for layer in cache.layers)
    longattn.unpatch(model)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_input_errors():
    with pytest.raises(ValueError, match="smaller than sink_tokens"):
        make_policy("streaming_llm", sink_tokens=8, kv_budget=4)
    with pytest.raises(ValueError, match="compression_ratio"):
        make_policy("h2o", compression_ratio=1.0)
    with pytest.raises(ValueError, match="compression_ratio"):
        make_policy("snapkv", compression_ratio=0)
    with pytest.raises(ValueError, match="unknown KV-cache policy"):
        make_policy("lru", kv_budget=4)
    with pytest.raises(ValueError, match="give kv_budget"):
        make_policy("tova")
    with pytest.raises(ValueError, match="kv_budget"):
        make_policy("knorm", kv_budget=0)
    model = make_model("llama")
    with pytest.raises(ValueError, match="cannot attend over a compressed KV cache"):
        longattn.patch(model, "block_topk", kv_cache={"policy": "h2o", "kv_budget": 8})
    with pytest.raises(ValueError, match="every layer"):
        longattn.patch(model, "dense", layers=[0], kv_cache={"policy": "h2o", "kv_budget": 8})
    with pytest.raises(ValueError, match="'policy' key"):
        longattn.patch(model, "dense", kv_cache={"kv_budget": 8})
    cache = CompressedCache(make_policy("knorm", kv_budget=4), model)  # unpatched model: no eviction possible
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 8)), cache=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="Patch the model first"):
            model(torch.randint(3, 96, (1, 1)), cache=cache, use_cache=True)


def test_context_compressed_once_then_several_questions():
    """kvpress's pipeline protocol: the context alone is compressed (the question cannot steer eviction), and each
    question decodes from its own copy of that cache."""
    import copy

    from longattn.kvcache import ask, compress_context

    model, tok = longattn.reference_model()
    from longattn.evals.tasks.passkey import make_passkey_sample

    s = make_passkey_sample(tok, 300, depth=0.3, seed=1)
    context = torch.tensor([s.input_ids[:-8]])
    questions = [" What is the pass key? The pass key is", " Repeat the pass key: the pass key is"]
    with pytest.raises(ValueError, match="patch the model with a KV policy first"):
        compress_context(model, context)
    longattn.patch(model, "snapkv", compression_ratio=0.5, window=8)
    cache = compress_context(model, context)
    keep = -(-context.shape[1] // 2)
    assert cache.attention_entry_counts() == [keep] * 4 and cache.get_seq_length() == context.shape[1]
    answers = ask(model, tok, context, questions, max_new_tokens=6)
    assert ask(model, tok, context, questions[1:], max_new_tokens=6) == answers[1:]  # questions do not interact
    # by hand: the same compressed cache, copied, continued by generate() with the question appended
    q = tok(questions[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([context, q], 1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), cache=copy.deepcopy(cache), max_new_tokens=6,
                         do_sample=False, pad_token_id=tok.eos_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == answers[0]
    longattn.unpatch(model)
