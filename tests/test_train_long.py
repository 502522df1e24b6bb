"""scripts/train_long.py under `accelerate launch` (gloo processes: ring SP 2, SP 2 x DP 2, Ulysses x ring SP 4):
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



def test_sequence_parallel_times_data_parallel_matches_one_process(tmp_path):
    """4 ranks = SP 2 x DP 2, one sequence per replica, equals one process with both sequences in its batch:
    gradients summed over each SP pair and averaged over the two replicas."""
    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "longattn" / "evals").glob("*.py")))
    (tmp_path / "data.txt").write_text(text)
    common = ["--dataset", str(tmp_path / "data.txt"), "--seq-len", "64", "--steps", "3", "--lr", "1e-3",
              "--warmup-steps", "1"]
    run([sys.executable, str(SCRIPT), *common, "--batch-size", "2", "--output-dir", str(tmp_path / "single")])
    run(launch(4, "--sequence-parallel", "2", *common, "--batch-size", "1", "--output-dir", str(tmp_path / "sp_dp")))
    single, parallel = losses(tmp_path / "single"), losses(tmp_path / "sp_dp")
    assert len(single) == len(parallel) == 3
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(single, parallel)]
    assert max(diffs) <= 1e-4, diffs
    bad = run(launch(2, "--sequence-parallel", "3", *common, "--output-dir", str(tmp_path / "bad")), expect_ok=False)
    assert bad.returncode != 0 and "world size 2 is not divisible by --sequence-parallel 3" in bad.stdout + bad.stderr


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
    assert "SP 4 (usp) x DP 1" in res.stdout + res.stderr
    ref = losses(tmp_path / "batch2")
    assert len(ref) == 3 and ref[0]["loss"] != ref[-1]["loss"]
    for name in ("accum", "usp"):
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
