"""FSDP2 x sequence parallelism on a named DeviceMesh (4 gloo processes): the loss and every parameter gradient
of the single-process run over the whole batch (fp32, tight), for FSDP x ring, HSDP x Ulysses and pure usp;
distributed checkpoints written by 4 processes load into 2 and into 1; bad degrees fail clearly; a killed
rank ends the others with an error."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn.parallel import ParallelDims, ShardLayout, fully_shard_model, sequence_parallel_loss, shift_labels
from longattn.parallel.fsdp import TrainState, full_tensor, load_checkpoint, save_checkpoint
from longattn.parallel.launch import run_distributed
from conftest import make_model

LOSS_TOL, GRAD_TOL = 1e-5, 1e-5
SEQ = 32

CASES = {  # name: (dims, method, params, mixed precision)
    "fsdp2-x-ring2": (dict(dp_shard=2, sp=2, strategy="ring"), "dense", {}),
    "hsdp2-x-ulysses2": (dict(dp_replicate=2, sp=2, strategy="ulysses"), "sink_window",
                         {"sink_tokens": 2, "window": 9}),
    "usp2x2": (dict(sp=4, strategy="usp", ulysses_size=2), "dense", {}),
}


def batch():
    ids = torch.randint(3, 96, (2, SEQ), generator=torch.Generator().manual_seed(0))
    labels = shift_labels(ids)
    labels[0, 3:11] = -100  # unequal token counts per replica: the mean must still be over the whole batch
    return ids, labels


def reference(method, params):
    model = make_model("llama")
    if method != "dense":
        longattn.patch(model, method, **params)
    ids, labels = batch()
    logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def sharded_step(dims: ParallelDims, method, params, mixed_precision="fp32"):
    """One forward + backward of the sharded model on this rank; (loss, model, layout coordinates)."""
    mesh = dims.build_mesh("cpu")
    model = make_model("llama")
    sp = mesh.sequence_parallel()
    longattn.patch(model, method, sequence_parallel=sp, **params)
    fully_shard_model(model, mesh.fsdp, mixed_precision=mixed_precision)
    ids, labels = batch()
    ids, labels = ids[mesh.dp_rank::dims.dp], labels[mesh.dp_rank::dims.dp]  # one sequence per data-parallel index
    layout = ShardLayout("zigzag", dims.sp)
    pos = layout.positions(mesh.sp_rank, SEQ).view(1, -1)
    logits = model(input_ids=layout.shard(ids, mesh.sp_rank), position_ids=pos, use_cache=False).logits
    loss = sequence_parallel_loss(logits, layout.shard(labels, mesh.sp_rank), group=None)  # over every rank
    loss.backward()
    return loss, model, mesh


def fsdp_worker(rank, world):
    out = {}
    for name, (dims, method, params) in CASES.items():
        ref_loss, ref_grads = reference(method, params)
        loss, model, _ = sharded_step(ParallelDims(**dims), method, params)
        grads = {n: full_tensor(p.grad) for n, p in model.named_parameters()}
        sharded = all(hasattr(p, "to_local") for p in model.parameters())
        err = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
        out[name] = dict(loss=abs(loss.item() - ref_loss), grad=err, sharded=sharded,
                         local=sum(p.to_local().numel() for p in model.parameters()),
                         total=sum(p.numel() for p in model.parameters()))
    ref_loss, ref_grads = reference("dense", {})
    loss, model, _ = sharded_step(ParallelDims(dp_shard=2, sp=2), "dense", {}, mixed_precision="bf16")
    grads = {n: full_tensor(p.grad) for n, p in model.named_parameters()}
    out["bf16"] = dict(loss=abs(loss.item() - ref_loss) / ref_loss,
                       grad=max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items()),
                       dtypes={str(p.dtype) for p in model.parameters()} | {str(g.dtype) for g in grads.values()})
    return out


def test_fsdp_times_sequence_parallel_equals_one_process():
    results = run_distributed(fsdp_worker, 4, timeout_s=300)
    for rank, res in enumerate(results):  # bf16 compute, fp32 master weights and gradients: close to fp32
        assert 0 < res["bf16"]["loss"] <= 1e-2 and res["bf16"]["grad"] <= 5e-2, res["bf16"]
        assert res["bf16"]["dtypes"] == {"torch.float32"}, res["bf16"]
    for name in CASES:
        for rank, res in enumerate(results):
            r = res[name]
            assert r["sharded"], (name, rank)
            assert r["loss"] <= LOSS_TOL and r["grad"] <= GRAD_TOL, (name, rank, r)
        # each rank holds about a quarter (FSDP over 4) or a half (HSDP: 2 shards per replica) of the weights
        share = sum(res[name]["local"] for res in results) / results[0][name]["total"]
        assert share == pytest.approx(2.0 if "hsdp" in name else 1.0, rel=0.01), (name, share)


def train(dims: ParallelDims, steps: range, ckpt, save_after=None, resume=False):
    """AdamW steps of the sharded model on the same batch; losses of `steps`, a checkpoint after `save_after`."""
    mesh = dims.build_mesh("cpu")
    model = make_model("llama")
    longattn.patch(model, "dense", sequence_parallel=mesh.sequence_parallel())
    fully_shard_model(model, mesh.fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    state = TrainState(0, scheduler)
    if resume:
        load_checkpoint(ckpt, model, optimizer, state)
        assert state.step == steps.start, (state.step, steps)
    ids, labels = batch()
    ids, labels = ids[mesh.dp_rank::dims.dp], labels[mesh.dp_rank::dims.dp]
    layout = ShardLayout("zigzag", dims.sp)
    losses = []
    for step in steps:
        pos = layout.positions(mesh.sp_rank, SEQ).view(1, -1)
        logits = model(input_ids=layout.shard(ids, mesh.sp_rank), position_ids=pos, use_cache=False).logits
        loss = sequence_parallel_loss(logits, layout.shard(labels, mesh.sp_rank))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        state.step = step + 1
        if state.step == save_after:
            save_checkpoint(ckpt, model, optimizer, state)
    return losses


def checkpoint_worker(rank, world, ckpt, dims, steps, save_after, resume):
    return train(ParallelDims(**dims), steps, ckpt, save_after, resume)


def test_checkpoint_from_four_processes_resumes_on_two_and_on_one(tmp_path):
    ckpt = tmp_path / "checkpoint-000002"
    full = run_distributed(checkpoint_worker, 4, ckpt, dict(dp_shard=2, sp=2), range(4), 2, False, timeout_s=300)[0]
    assert (ckpt / "complete").read_text() == "2\n" and not list(tmp_path.glob(".tmp-*"))
    assert full[0] > full[-1]  # it trains
    on_two = run_distributed(checkpoint_worker, 2, ckpt, dict(sp=2), range(2, 4), None, True, timeout_s=300)
    on_one = run_distributed(checkpoint_worker, 1, ckpt, dict(), range(2, 4), None, True, timeout_s=300)
    for resumed in (on_two[0], on_two[1], on_one[0]):
        assert max(abs(a - b) for a, b in zip(resumed, full[2:])) <= 1e-5, (resumed, full)


def dying_worker(rank, world):
    dims = ParallelDims(dp_shard=2)
    mesh = dims.build_mesh("cpu")
    model = fully_shard_model(make_model("llama"), mesh.fsdp)
    if rank == 1:
        os._exit(3)  # a rank that dies mid-run
    try:
        model(input_ids=torch.randint(3, 96, (1, 8)), use_cache=False).logits.sum().backward()
    except Exception as e:  # the survivor's collective fails instead of waiting forever
        return f"{type(e).__name__}: {e}"
    return None


def test_a_killed_rank_ends_the_others_with_an_error():
    results = run_distributed(dying_worker, 2, timeout_s=120, pg_timeout_s=30, may_exit=(1,))
    assert results[1] is None and results[0] is not None, results


def mesh_errors_worker(rank, world):
    try:
        ParallelDims(sp=4).build_mesh("cpu")
    except ValueError as e:
        return str(e)


def test_bad_parallel_degrees_fail_clearly():
    msg = run_distributed(mesh_errors_worker, 2, timeout_s=60)[0]
    assert msg and "= 4 ranks, but the world has 2" in msg
    with pytest.raises(ValueError, match="world size 4 is not divisible by dp_replicate 1 x sequence parallel 3"):
        ParallelDims.for_world(4, sp=3)
    with pytest.raises(ValueError, match="ulysses_size 3 must divide sp 4"):
        ParallelDims(sp=4, strategy="usp", ulysses_size=3)
    with pytest.raises(ValueError, match="ulysses_size is for strategy 'usp'"):
        ParallelDims(sp=2, ulysses_size=2)
    with pytest.raises(ValueError, match="dp_shard must be an integer >= 1"):
        ParallelDims(dp_shard=0)
    assert ParallelDims.for_world(8, dp_replicate=2, sp=2) == ParallelDims(2, 2, 2)
