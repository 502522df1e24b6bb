"""Ring attention over real gloo process groups (2 and 4 ranks) against single-process dense attention with an
explicit mask: outputs and q/k/v gradients in fp32 to 1e-5; block skipping and zigzag balance; dead peers."""
from __future__ import annotations

import os
import time

import pytest
import torch

from longattn.kernels.masks import dilated_window, sinks_and_window
from longattn.parallel import BlockPattern, MaskBlockPattern, ShardLayout, SequenceParallelError, ring_attention
from longattn.parallel.launch import run_distributed
from longattn.parallel.local import attend_runs
from longattn.parallel.patterns import CAUSAL_DIAGONAL, EMPTY, FULL, PARTIAL, run_positions

TOL = 1e-5
PATTERNS = {
    "causal": BlockPattern(),
    "full": BlockPattern(causal=False),
    "window": BlockPattern(window=5),
    "sinks": BlockPattern(window=5, sink_tokens=3),
}


def reference_attention(q, k, v, pattern: BlockPattern, scale: float):
    """The slow, obvious reference: explicit scores, explicit mask over absolute positions, softmax."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    pos = torch.arange(q.shape[2])
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~pattern.allowed(pos, pos), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def full_inputs(seed, seq, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, dim, generator=g) * 2  # larger logits make masking mistakes visible
    k = torch.randn(2, kv_heads, seq, dim, generator=g)
    v = torch.randn(2, kv_heads, seq, dim, generator=g)
    grad = torch.randn(2, heads, seq, dim, generator=g)
    return q, k, v, grad


def compare(attn_fn, rank, world, shard_layout: ShardLayout, pattern, seed, seq, heads, kv_heads, **kw):
    """Max abs errors of (out, dq, dk, dv) of this rank's shard vs the reference, sharded the same way."""
    q, k, v, grad = full_inputs(seed, seq, heads, kv_heads)
    layout, scale = shard_layout, 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, pattern, scale)
    (ref * grad).sum().backward()
    shard = [layout.shard(t, rank, dim=2).clone().requires_grad_() for t in (q, k, v)]
    out = attn_fn(*shard, pattern=pattern, scale=scale, **kw)
    (out * layout.shard(grad, rank, dim=2)).sum().backward()
    errs = [(out - layout.shard(ref, rank, dim=2)).abs().max().item()]
    errs += [(s.grad - layout.shard(l.grad, rank, dim=2)).abs().max().item() for s, l in zip(shard, leaves)]
    return errs


RING_CASES = [  # (name, layout kind, pattern, heads, kv heads, backend)
    ("causal-zigzag-mha", "zigzag", "causal", 4, 4, "auto"),
    ("causal-zigzag-gqa", "zigzag", "causal", 4, 2, "auto"),
    ("causal-contiguous-gqa", "contiguous", "causal", 4, 1, "auto"),
    ("full-zigzag-gqa", "zigzag", "full", 4, 2, "auto"),
    ("full-contiguous-mha", "contiguous", "full", 4, 4, "auto"),
    ("window-zigzag", "zigzag", "window", 4, 2, "auto"),
    ("window-contiguous", "contiguous", "window", 4, 2, "auto"),
    ("sinks-zigzag", "zigzag", "sinks", 4, 2, "auto"),
    ("causal-zigzag-math", "zigzag", "causal", 4, 2, "math"),  # the plain-torch kernels (CUDA backward path)
    ("sinks-contiguous-math", "contiguous", "sinks", 4, 2, "math"),
]


SMALL_BLOCK_CASES = ("causal-zigzag-gqa", "full-contiguous-mha", "sinks-zigzag", "sinks-contiguous-math")


def ring_worker(rank, world):
    import longattn.parallel.local as local

    results = {}
    for i, (name, kind, pat, h, hkv, backend) in enumerate(RING_CASES):
        layout = ShardLayout(kind, world)
        seq = 8 * layout.chunks  # 8 positions per chunk: windows of 5 cross chunk borders, skip whole blocks
        results[name] = compare(ring_attention, rank, world, layout, PATTERNS[pat], i, seq, h, hkv,
                                layout=layout, backend=backend)
    # Kernel calls capped at 3 positions per side: runs cut into uneven pieces (3, 3, 2), diagonal pieces,
    # skipped pieces above the diagonal, masks of pieces.
    local.MAX_BLOCK, default = 3, local.MAX_BLOCK
    for i, (name, kind, pat, h, hkv, backend) in enumerate(RING_CASES):
        if name in SMALL_BLOCK_CASES:
            layout = ShardLayout(kind, world)
            results[f"{name}-blocks-of-3"] = compare(ring_attention, rank, world, layout, PATTERNS[pat], 20 + i,
                                                     8 * layout.chunks, h, hkv, layout=layout, backend=backend)
    local.MAX_BLOCK = default
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_dense(world):
    per_rank = run_distributed(ring_worker, world, timeout_s=150)
    for rank, results in enumerate(per_rank):
        for name, errs in results.items():
            assert max(errs) <= TOL, f"rank {rank} {name}: max abs err (out, dq, dk, dv) = {errs}"


def test_patterns_classify_like_brute_force():
    """EMPTY / FULL from run bounds must agree with the explicit mask over every pair of runs."""
    for pattern in [*PATTERNS.values(), BlockPattern(window=1), BlockPattern(window=3, sink_tokens=8)]:
        for q0 in range(0, 20, 3):
            for k0 in range(0, 20, 2):
                for qn, kn in ((4, 4), (1, 7), (6, 2), (9, 12)):
                    m = pattern.block_mask((q0, qn), (k0, kn))
                    kind = pattern.classify((q0, qn), (k0, kn))
                    assert (kind == EMPTY) == (not m.any()), (pattern, q0, qn, k0, kn, kind)
                    if kind == FULL:
                        assert m.all(), (pattern, q0, qn, k0, kn)


def test_predicate_patterns_classify_like_their_explicit_mask():
    """A MaskBlockPattern (any predicate) gives the same blocks and kinds as the run-bound pattern where both
    exist (sinks + window, and within a model's window, which hides the sinks beyond it), and matches a
    brute-force dilated mask."""
    def explicit_dilated(q, k):
        d = q.view(-1, 1) - k.view(1, -1)
        return (d >= 0) & (d % 3 == 0) & (d < 12)

    cases = [(MaskBlockPattern(sinks_and_window(3, 5)), BlockPattern(window=5, sink_tokens=3).block_mask),
             (MaskBlockPattern(sinks_and_window(3, 9)).with_window(5), BlockPattern(window=5).block_mask),
             (BlockPattern(window=5, sink_tokens=3).with_window(8), lambda qr, kr: BlockPattern(
                 window=5, sink_tokens=3).block_mask(qr, kr) & BlockPattern(window=8).block_mask(qr, kr)),
             (MaskBlockPattern(dilated_window(4, 3)), lambda qr, kr: explicit_dilated(
                 torch.arange(qr[0], qr[0] + qr[1]), torch.arange(kr[0], kr[0] + kr[1])))]
    kinds = set()
    for pattern, reference in cases:
        for q0 in range(0, 20, 3):
            for k0 in range(0, 20, 2):
                for qn, kn in ((4, 4), (1, 7), (6, 2), (9, 12)):
                    qr, kr = (q0, qn), (k0, kn)
                    want = reference(qr, kr)
                    kind = pattern.classify(qr, kr)
                    kinds.add(kind)
                    assert torch.equal(pattern.block_mask(qr, kr), want), (pattern, qr, kr)
                    assert (kind == EMPTY) == (not want.any()) and (kind != FULL or bool(want.all())), (qr, kr)
        diagonal = torch.equal(reference((4, 4), (4, 4)), torch.ones(4, 4, dtype=torch.bool).tril())
        assert pattern.classify((4, 4), (4, 4)) == (CAUSAL_DIAGONAL if diagonal else PARTIAL), pattern
        kinds.add(CAUSAL_DIAGONAL if diagonal else PARTIAL)
    assert kinds == {EMPTY, FULL, PARTIAL, CAUSAL_DIAGONAL}


@pytest.mark.parametrize("native_gqa", [True, False])
def test_cpu_block_kernels_match_math(monkeypatch, native_gqa):
    """torch's CPU flash-attention kernels on strided slices (as a ring step passes them, no copies), with GQA
    heads unexpanded (this torch) or expanded (torch without GQA in those kernels), equal the plain-torch math
    kernels: unmasked, diagonal-causal and masked blocks, including rows with no allowed key."""
    import longattn.parallel.blocks as blocks

    monkeypatch.setattr(blocks, "cpu_kernels_take_gqa", lambda: native_gqa)
    q, k, v, dout = full_inputs(3, 32, heads=4, kv_heads=2)
    late, early = slice(16, 32), slice(0, 16)
    window = BlockPattern(window=5).block_mask((16, 16), (0, 16))  # rows 20.. see no key of this block
    assert not window.any(-1).all()
    for ks, mask, causal in ((early, None, False), (late, None, True), (early, window, False)):
        args = (q[:, :, late], k[:, :, ks], v[:, :, ks])
        assert not args[0].is_contiguous()
        out, lse = blocks.block_forward(*args, mask, causal, 0.3, "sdpa")
        ref_out, ref_lse = blocks.block_forward(*args, mask, causal, 0.3, "math")
        assert (out - ref_out).abs().max() <= TOL and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        assert (lse - ref_lse)[torch.isfinite(lse)].abs().max() <= TOL
        grads = blocks.block_backward(dout[:, :, late], *args, ref_out, ref_lse, mask, causal, 0.3, "sdpa")
        ref_grads = blocks.block_backward(dout[:, :, late], *args, ref_out, ref_lse, mask, causal, 0.3, "math")
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape and (g - r).abs().max() <= TOL


def test_fully_masked_blocks_are_skipped(monkeypatch):
    """A window narrower than a chunk: only blocks with an allowed pair reach the kernel."""
    import longattn.parallel.local as local

    calls = []
    real = local.block_forward
    monkeypatch.setattr(local, "block_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layout, seq = ShardLayout("zigzag", 4), 64
    pattern = BlockPattern(window=3, sink_tokens=2)
    q, k, v, _ = full_inputs(0, seq)
    for rank in range(4):
        for src in range(4):
            calls.clear()
            qr, kr = layout.runs(rank, seq), layout.runs(src, seq)
            out = torch.zeros(2, 4, 16, 8)
            lse = torch.full((2, 4, 16), float("-inf"))
            attend_runs(layout.shard(q, rank, 2), layout.shard(k, src, 2), layout.shard(v, src, 2), qr, kr, pattern,
                        0.3, "auto", out, lse)
            needed = sum(bool(pattern.block_mask(a, b).any()) for a in local.coalesce(qr) for b in local.coalesce(kr))
            assert len(calls) == needed


def test_zigzag_balances_causal_work():
    """Every rank attends the same number of causal pairs under zigzag (not under contiguous)."""
    seq, world = 64, 4
    pos = torch.arange(seq)
    for kind, balanced in (("zigzag", True), ("contiguous", False)):
        layout = ShardLayout(kind, world)
        work = [int(BlockPattern().allowed(run_positions(layout.runs(r, seq)), pos).sum()) for r in range(world)]
        assert (len(set(work)) == 1) == balanced, (kind, work)


def test_sharding_roundtrip_and_padding_errors():
    from longattn.parallel import pad_for_sharding, shift_labels

    x = torch.arange(2 * 24).view(2, 24)
    for kind in ("zigzag", "contiguous"):
        layout = ShardLayout(kind, 3)
        shards = [layout.shard(x, r) for r in range(3)]
        assert torch.equal(layout.unshard_local(shards), x)
        assert torch.equal(torch.cat([layout.positions(r, 24) for r in range(3)]).sort().values, torch.arange(24))
    with pytest.raises(ValueError, match="not divisible by 8.*pad_for_sharding"):
        ShardLayout("zigzag", 4).shard(torch.zeros(1, 30), 0)
    ids = torch.arange(1, 31).view(1, 30)
    padded, labels, pos = pad_for_sharding(ids, shift_labels(ids), ShardLayout("zigzag", 4), pad_token_id=0)
    assert padded.shape[1] == 32 and (labels[0, 29:] == -100).all() and labels[0, 28] == 30
    assert torch.equal(pos[0], torch.arange(32))


def test_bad_inputs_raise():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        ring_attention(q, q, q)
    with pytest.raises(ValueError, match="layout must be one of"):
        ShardLayout("striped", 2)
    with pytest.raises(ValueError, match="need causal=True"):
        BlockPattern(causal=False, window=4)


def hung_peer_worker(rank, world, flag):
    """Rank 1 never joins the ring (as if stuck in another step); rank 0 must fail within its timeout."""
    if rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.1)
        return None
    q = torch.randn(1, 2, 8, 4)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q, timeout_s=3)
    except SequenceParallelError as e:
        return time.monotonic() - t0, str(e)
    finally:
        open(flag, "w").close()
    return None


def dead_peer_worker(rank, world):
    """Rank 1 dies; rank 0's ring exchange must end with a clear error, not a hang."""
    if rank == 1:
        os._exit(1)
    q = torch.randn(1, 2, 8, 4)
    t0 = time.monotonic()
    try:
        ring_attention(q, q, q, timeout_s=5)
    except SequenceParallelError as e:
        return time.monotonic() - t0, str(e)
    return None


def test_hung_or_dead_peer_gives_clear_error_within_timeout(tmp_path):
    elapsed, msg = run_distributed(hung_peer_worker, 2, str(tmp_path / "done"), timeout_s=60)[0]
    assert elapsed < 15 and "ring attention forward" in msg and "peer rank" in msg, (elapsed, msg)
    res = run_distributed(dead_peer_worker, 2, timeout_s=60, may_exit=(1,))[0]
    assert res is not None, "rank 0 finished the ring although its peer had died"
    elapsed, msg = res
    assert elapsed < 20 and "ring attention forward" in msg, (elapsed, msg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn block kernels need CUDA (none on this machine)")
def test_flash_block_kernel_matches_math_on_cuda():
    """On CUDA with flash-attn: the flash forward (unmasked and diagonal-causal blocks) against the plain-torch
    math kernel, bf16 inputs, tolerance of bf16 (2e-2); the backward path there is the math kernel."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from longattn.kernels.primitives import flash_attn_available
    from longattn.parallel.blocks import block_forward

    q, k, v, _ = (t.cuda().bfloat16() for t in full_inputs(0, 256, 8, 2, 64))
    assert flash_attn_available(q)
    for causal in (False, True):
        out, lse = block_forward(q, k, v, None, causal, 0.125, "flash")
        ref_out, ref_lse = block_forward(q, k, v, None, causal, 0.125, "math")
        assert (out.float() - ref_out.float()).abs().max() < 2e-2
        assert (lse - ref_lse).abs().max() < 2e-2
