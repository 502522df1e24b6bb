"""A patched Hugging Face model on a sharded sequence (gloo, 2 and 4 ranks): logits, the full-sequence loss and
every parameter gradient equal the single-process run; bad set-ups fail with clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import longattn
from longattn.parallel import ParallelDims, SequenceParallel, ShardLayout, sequence_parallel_loss, shift_labels
from longattn.parallel.launch import run_distributed
from longattn.methods.base import sequence_parallel_methods
from conftest import make_model
from registry import METHOD_CASES

# Loss: max abs difference. Gradients: max abs difference of each parameter's gradient divided by the largest
# entry of that gradient (fp32, summation order differs across ranks).
LOSS_TOL, GRAD_TOL = 1e-5, 1e-5

CASES = [  # (name, arch, config overrides, method, method params, strategy, layout)
    ("llama-gqa-dense-ring", "llama", {}, "dense", {}, "ring", "zigzag"),
    ("llama-mha-dense-ring-contiguous", "llama", {"num_key_value_heads": 4}, "dense", {}, "ring", "contiguous"),
    ("llama-gqa-dense-ulysses", "llama", {}, "dense", {}, "ulysses", "zigzag"),
    ("mistral-own-window-ring", "mistral", {}, "dense", {}, "ring", "zigzag"),
    # the method's sinks within the model's own window of 8 only, as the single-process mask has them
    ("mistral-own-window-sinks-ring", "mistral", {}, "sink_window", {"sink_tokens": 2, "window": 5}, "ring", "zigzag"),
] + [  # every method that runs sequence-parallel, with its registry parameters
    (f"llama-{name}-ring", "llama", {}, name, METHOD_CASES[name].params, "ring", "zigzag")
    for name in sequence_parallel_methods() if name != "dense"
]
# 4 ranks only: Ulysses over pairs of ranks (2 KV heads each), ring across the pairs
USP_CASE = ("llama-gqa-sinks-usp", "llama", {}, "sink_window", {"sink_tokens": 2, "window": 20}, "usp", "zigzag")


def explicit_density(seq: int, window: int | None) -> float:
    """Allowed / causal query-key pairs of causal attention (within `window` keys) from an explicit mask."""
    pos = torch.arange(seq)
    allowed = pos.view(1, -1) <= pos.view(-1, 1)
    if window is not None:
        allowed &= pos.view(-1, 1) - pos.view(1, -1) < window
    return allowed.sum().item() / (seq * (seq + 1) / 2)


def full_loss(model, ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits
    return logits, F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def average_gradients(model):
    """What FSDP2 / DDP do with gradients (the reduction sequence_parallel_loss is written for): their mean."""
    import torch.distributed as dist

    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()


def hf_worker(rank, world, cases):
    results = {}
    for i, (name, arch, overrides, method, params, strategy, kind) in enumerate(cases):
        layout = ShardLayout(kind, world)
        seq = 8 * layout.chunks
        ids = torch.randint(3, 96, (2, seq), generator=torch.Generator().manual_seed(i))
        labels = shift_labels(ids)
        labels[0, 5:9] = -100  # ignored tokens: the mean must count only the real ones, over every rank
        ref_model = make_model(arch, **overrides)
        if method != "dense":
            longattn.patch(ref_model, method, **params)  # the single-process method is the reference
        ref_logits, ref_loss = full_loss(ref_model, ids, labels)
        ref_loss.backward()
        model = make_model(arch, **overrides)
        sp = SequenceParallel(size=world, strategy=strategy, layout=kind, ulysses_size=2 if strategy == "usp" else 1)
        longattn.patch(model, method, sequence_parallel=sp, **params)
        pos = layout.positions(rank, seq).expand(2, -1)
        logits = model(input_ids=layout.shard(ids, rank), position_ids=pos, use_cache=False).logits
        loss = sequence_parallel_loss(logits, layout.shard(labels, rank))
        loss.backward()
        average_gradients(model)
        grad_err = max(((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-12)).item()
                       for p, r in zip(model.parameters(), ref_model.parameters()))
        # Density meter: over the full sequence on every rank, equal to the single-process patched model's
        # (window methods) or to the explicit mask's (dense: causal, or the model's own sliding window).
        density = model._longattn.meter.density("prefill")
        if method != "dense":
            ref_density = ref_model._longattn.meter.density("prefill")
        else:
            ref_density = explicit_density(seq, getattr(ref_model.config, "sliding_window", None))
        results[name] = dict(loss=abs(loss.item() - ref_loss.item()), grad=grad_err,
                             logits=(layout.unshard(logits.detach()) - ref_logits).abs().max().item(),
                             density=density, ref_density=ref_density)
    return results, (errors_worker(rank, world) if world == 2 else groups_worker(rank, world))


def groups_worker(rank, world):
    """The training mesh on 4 ranks: which global ranks each dimension's group holds (an all-gather over it) for
    dp_shard 2 x ring 2 and for usp (Ulysses pairs x ring of 2), and a usp SequenceParallel that rejects
    sub-groups of the wrong size."""
    import torch.distributed as dist

    def members(group):
        got = [torch.zeros((), dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(got, torch.tensor(rank), group=group)
        return [int(t) for t in got]

    mesh = ParallelDims(dp_shard=2, sp=2).build_mesh("cpu")
    out = {"sp": members(mesh.sp.get_group()), "dp": members(mesh.dp.get_group()),
           "fsdp": members(mesh.fsdp.get_group())}
    usp = ParallelDims(sp=4, strategy="usp", ulysses_size=2).build_mesh("cpu").sequence_parallel()
    out["ulysses"], out["ring"] = (members(g) for g in usp.usp_groups)
    try:
        longattn.patch(make_model("llama"), "dense", sequence_parallel=SequenceParallel(
            group=usp.group, strategy="usp", ulysses_size=1, usp_groups=usp.usp_groups))
        out["error"] = None
    except ValueError as e:
        out["error"] = str(e)
    return out


def errors_worker(rank, world):
    msgs = {}
    model = make_model("llama")
    for key, call in {
        "size": lambda: longattn.patch(model, "dense", sequence_parallel=world + 1),
        "method": lambda: longattn.patch(model, "block_topk", sequence_parallel=world),
        "layers": lambda: longattn.patch(model, "dense", layers=[0], sequence_parallel=world),
    }.items():
        try:
            call()
            msgs[key] = None
        except (ValueError, NotImplementedError) as e:
            msgs[key] = f"{type(e).__name__}: {e}"
    longattn.patch(model, "dense", sequence_parallel=world)
    ids = torch.randint(3, 96, (1, 16))
    for key, kw in {"positions": dict(position_ids=torch.arange(8).view(1, 8)),
                    "padding": dict(attention_mask=torch.tensor([[0, 0] + [1] * 6]),
                                    position_ids=ShardLayout("zigzag", world).positions(rank, 16).view(1, 8))}.items():
        try:
            model(input_ids=ShardLayout("zigzag", world).shard(ids, rank), use_cache=False, **kw)
            msgs[key] = None
        except (ValueError, NotImplementedError) as e:
            msgs[key] = f"{type(e).__name__}: {e}"
    longattn.unpatch(model)
    msgs["unpatched"] = not any(hasattr(m, "_longattn_sp") for m in model.modules())
    return msgs


@pytest.mark.parametrize("world", [2, 4])
def test_hf_model_under_sequence_parallel_matches_single_process(world):
    """The set-ups on 2 ranks (plus the error checks, sharing the process group), two on 4."""
    cases = CASES if world == 2 else CASES[:1] + [USP_CASE]
    per_rank = run_distributed(hf_worker, world, cases, timeout_s=170)
    for rank, (results, _) in enumerate(per_rank):
        assert len(results) == len(cases)
        for name, err in results.items():
            assert err["loss"] <= LOSS_TOL and err["grad"] <= GRAD_TOL and err["logits"] <= 1e-4, (rank, name, err)
            assert err["density"] is not None and abs(err["density"] - err["ref_density"]) <= 1e-12, (rank, name, err)
    windowed = [r for r in per_rank[0][0].values() if r["ref_density"] < 1]
    assert windowed, "no case with a density below 1: the comparison would not show a wrong count"
    if world == 2:
        check_error_messages(per_rank[0][1])
    else:
        for rank, (_, members) in enumerate(per_rank):
            pair = [rank - rank % 2, rank - rank % 2 + 1]  # consecutive ranks share a sequence
            assert members["sp"] == members["ulysses"] == pair, members
            assert members["dp"] == members["ring"] == [rank % 2, rank % 2 + 2], members
            assert members["fsdp"] == [0, 1, 2, 3], members  # FSDP shards over data and sequence ranks
            assert "Ulysses group of 2 x ring group of 2 ranks, but ulysses_size is 1" in members["error"]


def check_error_messages(msgs):
    assert "requested size 3 but the process group has 2 ranks" in msgs["size"]
    assert msgs["method"].startswith("NotImplementedError") and "'block_topk'" in msgs["method"]
    assert "every attention layer" in msgs["layers"]
    assert "position_ids are not its zigzag shard" in msgs["positions"]
    assert "padding masks" in msgs["padding"]
    assert msgs["unpatched"]
