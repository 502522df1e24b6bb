"""scripts/train_long.py under `accelerate launch` (gloo processes: ring SP 2, FSDP 2 x SP 2, Ulysses x ring SP 4,
HSDP 2 x SP 2 with activation checkpointing):
the same loss curve as one process on the full sequence (to 1e-4), an interrupted run resumes from its
checkpoint, and gradient accumulation equals a larger batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_long.py"
CONFIG = ROOT / "scripts" / "accelerate_cpu.yaml"
TIMEOUT = 240  # seconds per launch: a hung rank fails the test instead of hanging it


def run(cmd, expect_ok=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def launch(n, *args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes",
            str(n), str(SCRIPT), *args]


def losses(out_dir: Path):
    return [json.loads(line) for line in (out_dir / "loss_log.jsonl").read_text().splitlines()]


def test_two_process_sequence_parallel_matches_one_process_and_resumes(tmp_path):
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "longattn" / "kernels").glob("*.py")))
    (tmp_path / "data.txt").write_text(text)
    common = ["--dataset", str(tmp_path / "data.txt"), "--seq-len", "128", "--steps", "6", "--lora-rank", "4",
              "--lr", "1e-3", "--warmup-steps", "2", "--save-every", "2"]
    run([sys.executable, str(SCRIPT), *common, "--output-dir", str(tmp_path / "single")])
    sp = tmp_path / "sp"
    run(launch(2, "--sequence-parallel", "2", *common, "--output-dir", str(sp), "--stop-at", "4"))
    assert [r["step"] for r in losses(sp)] == [1, 2, 3, 4]
    assert (sp / "checkpoint-000004" / "complete").exists()
    res = run(launch(2, "--sequence-parallel", "2", *common, "--output-dir", str(sp)))
    assert "resuming after step 4" in res.stdout + res.stderr
    single, parallel = losses(tmp_path / "single"), losses(sp)
    assert [r["step"] for r in parallel] == list(range(1, 7))
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(single, parallel)]
    assert max(diffs) <= 1e-4, diffs
    assert single[0]["loss"] != single[-1]["loss"]  # it trains: the curve is not flat
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(sp / "final")  # LoRA merged into a plain HF model
    assert final.config._attn_implementation != "longattn" and not hasattr(final, "peft_config")



def test_fsdp_times_sequence_parallel_resumes_on_fewer_processes(tmp_path):
    """4 ranks = FSDP 2 x SP 2, one sequence per data rank, interrupted after step 2, resumed on 2 processes (SP 2,
    both sequences on each pair): the loss curve of one process with both sequences in its batch, uninterrupted.
    The checkpoint (torch.distributed.checkpoint) is resharded from 4 FSDP shards to 2."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "longattn" / "evals").glob("*.py")))
    (tmp_path / "data.txt").write_text(text)
    common = ["--dataset", str(tmp_path / "data.txt"), "--seq-len", "64", "--steps", "4", "--lr", "1e-3",
              "--warmup-steps", "1", "--save-every", "2"]
    run([sys.executable, str(SCRIPT), *common, "--batch-size", "2", "--output-dir", str(tmp_path / "single")])
    out = tmp_path / "sharded"
    res = run(launch(4, "--sequence-parallel", "2", *common, "--batch-size", "1", "--stop-at", "2",
                     "--output-dir", str(out)))
    assert "DP shard 2 x SP 2 (ring); FSDP2 over 4 ranks" in res.stdout + res.stderr
    assert (out / "checkpoint-000002" / "complete").exists() and (out / "checkpoint-000002" / ".metadata").exists()
    res = run(launch(2, "--sequence-parallel", "2", *common, "--batch-size", "2", "--output-dir", str(out)))
    assert "resuming after step 2" in res.stdout + res.stderr
    single, parallel = losses(tmp_path / "single"), losses(out)
    assert [r["step"] for r in parallel] == [1, 2, 3, 4]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(single, parallel)]
    assert max(diffs) <= 1e-4, diffs
    # rank 0 holds a quarter, then a half, of the weights (no LoRA: all of them train)
    assert parallel[0]["rank0_bytes"]["weights"] * 4 == pytest.approx(single[0]["rank0_bytes"]["weights"], rel=0.01)
    assert parallel[2]["rank0_bytes"]["weights"] * 2 == pytest.approx(single[0]["rank0_bytes"]["weights"], rel=0.01)
    assert parallel[0]["rank0_bytes"]["optimizer"] * 4 == pytest.approx(single[0]["rank0_bytes"]["optimizer"], rel=0.01)
    bad = run(launch(2, "--sequence-parallel", "3", *common, "--output-dir", str(tmp_path / "bad")), expect_ok=False)
    assert bad.returncode != 0 and "world size 2 is not divisible by dp_replicate 1 x sequence parallel 3" in \
        bad.stdout + bad.stderr
    bad = run(launch(2, "--dp-shard", "2", "--sequence-parallel", "2", *common, "--output-dir", str(tmp_path / "bad")),
              expect_ok=False)
    assert "= 4 ranks, but 2 processes were launched" in bad.stdout + bad.stderr


def test_grad_accum_equals_larger_batch_and_usp_equals_one_process(tmp_path, capsys):
    """--grad-accum 2 with batch 1 gives the loss curve (and gradient norms) of batch 2 without accumulation,
    in one process and under `accelerate launch` of 4 processes with --strategy usp (Ulysses pairs x a ring of
    2 over one sequence); bad Ulysses sizes are rejected."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "longattn" / "parallel").glob("*.py")))
    (tmp_path / "data.txt").write_text(text)
    common = ["--dataset", str(tmp_path / "data.txt"), "--seq-len", "64", "--steps", "3", "--lr", "1e-3",
              "--warmup-steps", "1"]
    run([sys.executable, str(SCRIPT), *common, "--batch-size", "2", "--output-dir", str(tmp_path / "batch2")])
    accum = ["--batch-size", "1", "--grad-accum", "2"]
    run([sys.executable, str(SCRIPT), *common, *accum, "--output-dir", str(tmp_path / "accum")])
    res = run(launch(4, "--sequence-parallel", "4", "--strategy", "usp", "--ulysses-size", "2", *common, *accum,
                     "--output-dir", str(tmp_path / "usp")))
    assert "DP shard 1 x SP 4 (usp)" in res.stdout + res.stderr
    # HSDP (2 replicas of FSDP over the 2 sequence ranks) with each decoder layer recomputed in the backward
    res = run(launch(4, "--dp-replicate", "2", "--sequence-parallel", "2", "--activation-checkpointing", *common,
                     "--batch-size", "1", "--output-dir", str(tmp_path / "hsdp")))
    assert "DP replicate 2 x DP shard 1 x SP 2 (ring); FSDP2 over 2 ranks" in res.stdout + res.stderr
    ref = losses(tmp_path / "batch2")
    assert len(ref) == 3 and ref[0]["loss"] != ref[-1]["loss"]
    # bf16 compute (FSDP2 parameter dtype) over fp32 master weights: close to the fp32 curve, not equal
    run(launch(2, "--mixed-precision", "bf16", *common, "--batch-size", "1", "--output-dir", str(tmp_path / "bf16")))
    bf16 = losses(tmp_path / "bf16")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, bf16)) <= 0.05, (ref, bf16)
    assert any(a["loss"] != b["loss"] for a, b in zip(ref, bf16))  # it really ran in bf16
    for name in ("accum", "usp", "hsdp"):
        got = losses(tmp_path / name)
        assert [r["step"] for r in got] == [1, 2, 3] and [r["tokens"] for r in got] == [r["tokens"] for r in ref]
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ref, got)]
        assert max(diffs) <= 1e-4, (name, diffs)
        norms = [abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(ref, got)]
        assert max(norms) <= 1e-4, (name, norms)

    import importlib.util

    spec = importlib.util.spec_from_file_location("train_long", SCRIPT)
    train_long = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_long)
    for bad in (["--sequence-parallel", "2", "--strategy", "usp", "--ulysses-size", "3"], ["--grad-accum", "0"]):
        with pytest.raises(SystemExit):
            train_long.parse_args(bad)
    err = capsys.readouterr().err
    assert "--ulysses-size 3 must divide --sequence-parallel 2" in err and "--grad-accum" in err
