"""Sweeps: validation, dry run, a real SIGKILL mid-sweep then resume (no lost or repeated cell), reports."""
import json
import signal
import subprocess
import sys
import time

import pytest

from longattn.evals.report import markdown_table, write_report
from longattn.evals.sweep import load_sweep, read_results, run_sweep
from conftest import make_model

SWEEP = """
name = "t"
model = "{model}"
samples = 2
batch_size = 2
lengths = [256, 320]
tasks = ["passkey", {{ name = "niah_multikey", needles = 2 }}]
[[methods]]
method = "dense"
[[methods]]
method = "sliding_window"
grid = {{ window = [16, 32] }}
[perplexity]
text = "{text}"
lengths = [32]
tokens = 256
"""


@pytest.fixture
def sweep_setup(tmp_path, small_tokenizer):
    model = make_model("llama", vocab_size=len(small_tokenizer), max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    small_tokenizer.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: attention over long contexts costs memory." for i in range(200)))
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(model=tmp_path / "model", text=text))
    return path, model, small_tokenizer


def test_cells_and_dry_run(sweep_setup, tmp_path, capsys):
    path, _, _ = sweep_setup
    sweep = load_sweep(path)
    assert len(sweep.cells) == 3 * (2 * 2 + 1)  # 3 method configs x (2 tasks x 2 lengths + 1 perplexity)
    assert len({c.key() for c in sweep.cells}) == len(sweep.cells)
    run_sweep(sweep, tmp_path / "r.jsonl", dry_run=True)
    out = capsys.readouterr().out
    assert "15 cells, 0 done, 15 to run" in out and "[todo] sliding_window {'window': 16} passkey @ 256" in out
    assert not (tmp_path / "r.jsonl").exists()


def test_killed_sweep_resumes_without_losing_or_repeating(sweep_setup, tmp_path):
    path, _, _ = sweep_setup
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "longattn.cli", "sweep", str(path), "--out", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 3):
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_results(results)
    assert 3 <= len(before) < 15, "the sweep should have been killed part-way"
    with open(results, "a") as f:
        f.write('{"cell": "torn')  # as if killed in the middle of writing a line
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    after = read_results(results)
    keys = [r["cell"] for r in after if r["record"] == "cell"]
    assert len(keys) == 15 and len(set(keys)) == 15  # every cell exactly once
    prompts = [(r["cell"], r["index"]) for r in after if r["record"] == "sample"]
    assert len(prompts) == 12 * 2 and len(set(prompts)) == len(prompts)  # every prompt of the 12 task cells once
    assert after[:len(before)] == before  # finished work was kept, not redone
    assert {c.key() for c in load_sweep(path).cells} == set(keys)


def test_cell_killed_mid_way_resumes_from_its_prompts(sweep_setup, tmp_path):
    """Prompts recorded before a kill are kept and not run again; the resumed cell equals an uninterrupted one."""
    from longattn.evals.runner import Cell
    from longattn.evals.sweep import run_cells

    _, model, tok = sweep_setup
    cell = Cell("task", "sliding_window", 256, {"window": 32}, task="passkey", samples=4)
    whole = run_cells([cell], tmp_path / "whole.jsonl", "tiny", model_and_tokenizer=(model, tok), batch_size=1,
                      progress=False)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(r) + "\n" for r in whole[:2]) + '{"record": "sample", "ce')  # killed mid-line
    resumed = run_cells([cell], cut, "tiny", model_and_tokenizer=(model, tok), batch_size=1, progress=False)
    assert resumed[:2] == whole[:2]  # the finished prompts, untouched
    assert [r["index"] for r in resumed if r["record"] == "sample"] == [0, 1, 2, 3]
    final, reference = resumed[-1], whole[-1]
    assert final["record"] == "cell" and final["resumed_samples"] == 2 and reference["resumed_samples"] == 0
    for key in ("score", "score_ci95", "n", "density_prefill", "kv_cache_bytes", "predictions", "prompt_tokens"):
        assert final[key] == reference[key], key
    with pytest.raises(ValueError, match="holds results of model tiny in torch.float32; this run is tiny in "
                                         "torch.bfloat16"):
        run_cells([cell], cut, "tiny", dtype="bfloat16", model_and_tokenizer=(model, tok), progress=False)


def test_records_and_report(sweep_setup, tmp_path):
    path, model, tok = sweep_setup
    sweep = load_sweep(path)
    sweep.cells = [c for c in sweep.cells if c.length in (320, 32)]
    everything = run_sweep(sweep, tmp_path / "r.jsonl", model_and_tokenizer=(model, tok), progress=False)
    records = [r for r in everything if r["record"] == "cell"]
    assert len(records) == 9 and len(everything) == 9 + 6 * 2  # and 2 prompt records per task cell
    for r in records:
        for key in ("score", "density", "wall_s", "tokens_per_s", "peak_mem_bytes", "method", "params", "length",
                    "phase", "model", "seed", "versions"):
            assert key in r, key
    dense = next(r for r in records if r["method"] == "dense" and r["kind"] == "task")
    window = next(r for r in records if r["params"].get("window") == 16 and r["kind"] == "task")
    assert dense["density_prefill"] == 1.0
    # window 16 over 320 causal positions: (16 * 320 - 16 * 15 / 2) / (320 * 321 / 2)
    assert window["density_prefill"] == pytest.approx((16 * 320 - 120) / (320 * 321 / 2))
    assert dense["kv_cache_bytes"] > 0 and dense["versions"]["torch"]
    ppl = [r for r in records if r["kind"] == "perplexity"]
    assert len(ppl) == 3 and all(r["perplexity"] > 1 for r in ppl)
    table = markdown_table(records)
    assert "| passkey | 320 | sliding_window(window=16) |" in table and "| perplexity |" in table
    written = write_report(records, tmp_path / "report", title="t")
    assert {p.name for p in written} == {"report.md", "score_vs_density.png", "score_vs_length.png",
                                         "perplexity_vs_length.png"}
    assert all(p.stat().st_size > 1000 for p in written)


@pytest.mark.parametrize("content, message", [
    ("name = 'x'\nbogus = 1\n[[methods]]\nmethod = 'dense'\n", r"unknown field\(s\) \['bogus'\]"),
    ("name = 'x'\nlengths = [64]\ntasks = ['passkey']\n", r"needs at least one \[\[methods\]\]"),
    ("lengths = [64]\ntasks = ['passkey']\n[[methods]]\nmethod = 'sliding_window'\ngrid = { window = [0] }\n",
     r"methods\[0\]: sliding_window: parameter 'window' must be an integer >= 1"),
    ("lengths = [64]\ntasks = ['passkey']\n[[methods]]\nmethod = 'magic'\n", r"unknown attention method or recipe 'magic'"),
    ("lengths = [64]\ntasks = ['needles']\n[[methods]]\nmethod = 'dense'\n", r"tasks: unknown task 'needles'"),
    ("tasks = ['passkey']\n[[methods]]\nmethod = 'dense'\n", "tasks need 'lengths'"),
    ("name = \n", "not valid TOML"),
])
def test_bad_sweep_files(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_sweep(path)


def test_bad_results_line_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"cell": "a"}\nnot json\n{"cell": "b"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: not valid JSON"):
        read_results(path)


def test_text_loading_errors(tmp_path):
    from longattn.evals.texts import load_text

    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: missing field 'text'"):
        load_text(str(bad))
    ok = tmp_path / "t.parquet"
    import datasets

    datasets.Dataset.from_dict({"text": ["one line", "two lines"]}).to_parquet(str(ok))
    assert load_text(str(ok)) == "one line\n\ntwo lines"
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "t.csv").write_text("a")
        load_text(str(tmp_path / "t.csv"))


def test_kv_policies_in_a_sweep(sweep_setup, tmp_path):
    """A sweep over KV budgets: cells run generate() with the compressed cache (bytes kept <= budget), no
    perplexity cells for policies, and the report plots score vs KV budget."""
    _, model, tok = sweep_setup
    path = tmp_path / "kv.toml"
    path.write_text('name = "kv"\nsamples = 2\nbatch_size = 2\nlengths = [256]\ntasks = ["passkey"]\n'
                    '[[methods]]\nmethod = "dense"\n'
                    '[[methods]]\nmethod = "snapkv"\ngrid = { kv_budget = [32, 64] }\n'
                    '[[methods]]\nmethod = "sliding_window"\nparams = { window = 64, kv_cache = { policy = "h2o", '
                    'kv_budget = 48 } }\n'
                    '[perplexity]\ntext = "python-doc"\nlengths = [64]\ntokens = 256\n')
    sweep = load_sweep(path)
    assert [c.kind for c in sweep.cells].count("perplexity") == 1  # dense only
    sweep.cells = [c for c in sweep.cells if c.kind == "task"]
    records = run_sweep(sweep, tmp_path / "kv.jsonl", model_and_tokenizer=(model, tok), progress=False)
    records = [r for r in records if r["record"] == "cell"]
    per_token = 2 * 3 * 2 * 16 * 4  # keys + values, layers, KV heads, head dim, fp32 (per sample)
    by = {(r["method"], r["params"].get("kv_budget")): r["kv_cache_bytes"] for r in records}
    assert by["snapkv", 32] == 32 * per_token and by["snapkv", 64] == 64 * per_token
    assert by["sliding_window", None] == 48 * per_token
    assert by["dense", None] > 256 * per_token
    written = write_report(records, tmp_path / "kvreport", title="kv")
    assert "score_vs_kv_budget.png" in {p.name for p in written}


def test_text_file_is_read_as_it_is(tmp_path):
    from longattn.evals.texts import check_text_spec, load_text

    path = tmp_path / "t.txt"
    path.write_text("First paragraph.\n\n\nSecond, after two empty lines.\n  indented\n")
    assert load_text(str(path)) == path.read_text()  # empty lines and indentation kept
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_text_spec(str(tmp_path / "absent.txt"))
    check_text_spec("licenses")


def _cells_by_key(records):
    cells = [r for r in records if r.get("record", "cell") == "cell"]
    assert len(cells) == len({r["cell"] for r in cells}), "a cell was recorded twice"
    return {r["cell"]: r for r in cells}


def _same_scores(a, b):
    """Two runs of the same cells measured the same things (times and dates aside)."""
    a, b = _cells_by_key(a), _cells_by_key(b)
    assert set(a) == set(b)
    for key in a:
        for field in ("score", "n", "perplexity", "predictions", "density_prefill", "density_decode",
                      "kv_cache_bytes"):
            assert a[key].get(field) == b[key].get(field), (field, key)


def test_shards_cover_every_cell_once_and_merge(sweep_setup, tmp_path):
    from longattn.evals.shards import Shard, shard_files

    path, model, tok = sweep_setup
    sweep = load_sweep(path)
    single = run_sweep(sweep, tmp_path / "one.jsonl", model_and_tokenizer=(model, tok), progress=False)
    out = tmp_path / "sharded" / "results.jsonl"
    owned = [set(c.key() for c in Shard(i, 3).owns(sweep.cells)) for i in range(3)]
    assert sum(map(len, owned)) == len(sweep.cells) and set.union(*owned) == {c.key() for c in sweep.cells}
    first = run_sweep(sweep, out, model_and_tokenizer=(model, tok), progress=False, shard=Shard(2, 3))
    assert not out.exists() and [p.name for p in shard_files(out)] == ["results.shard-2-of-3.jsonl"]
    assert set(_cells_by_key(first)) == owned[2]
    run_sweep(sweep, out, model_and_tokenizer=(model, tok), progress=False, shard=Shard(0, 3))
    merged = run_sweep(sweep, out, model_and_tokenizer=(model, tok), progress=False, shard=Shard(1, 3))
    assert shard_files(out) == [] and read_results(out) == merged  # the last shard merged and tidied up
    _same_scores(merged, single)
    prompts = [(r["cell"], r["index"]) for r in merged if r["record"] == "sample"]
    assert len(prompts) == 12 * 2 == len(set(prompts))


def test_killed_shard_resumes_and_the_last_one_merges(sweep_setup, tmp_path):
    path, _, _ = sweep_setup
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "longattn.cli", "sweep", str(path), "--out", str(out), "--threads", "1"]
    mine = tmp_path / "results.shard-0-of-2.jsonl"
    proc = subprocess.Popen(cmd + ["--shard", "0/2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not mine.exists() or len(mine.read_text().splitlines()) < 2):
        assert proc.poll() is None, "the shard ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_results(mine)
    other = subprocess.run(cmd + ["--shard", "1/2"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr[-2000:]
    assert "still to run in other shards" in other.stdout and not out.exists()
    again = subprocess.run(cmd + ["--shard", "0/2"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "wrote" in again.stdout  # the last shard writes the report
    merged = read_results(out)
    assert merged[:len(killed)] == killed  # shard 0's finished prompts kept, in order, not redone
    assert set(_cells_by_key(merged)) == {c.key() for c in load_sweep(path).cells}
    prompts = [(r["cell"], r["index"]) for r in merged if r["record"] == "sample"]
    assert len(prompts) == 12 * 2 == len(set(prompts))
    assert not mine.exists() and (tmp_path / "report.md").exists()


def test_shard_arguments_and_launchers(monkeypatch):
    import argparse

    from longattn.cli import _sweep_shard
    from longattn.evals.shards import Shard, parse_shard

    assert parse_shard("1/4") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="expects i/N|0 <= i < N"):
            parse_shard(bad)
    args = argparse.Namespace(shard=None, device="cpu", threads=1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _sweep_shard(args) is None
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun / accelerate launch set them
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _sweep_shard(args) == Shard(2, 3)
    args.shard = "0/2"  # an explicit --shard wins
    assert _sweep_shard(args) == Shard(0, 2)


def test_ray_backend_survives_a_killed_worker(sweep_setup, tmp_path):
    """Cells as Ray tasks on a local instance: a worker SIGKILLed mid-cell is retried, every cell is recorded
    once, and the scores equal one process's."""
    ray = pytest.importorskip("ray")
    import threading

    import psutil

    from longattn.evals.ray_backend import run_cells_ray

    path, model, tok = sweep_setup
    sweep = load_sweep(path)
    cells = [c for c in sweep.cells if c.length == 256 or c.kind == "perplexity"]
    single = run_sweep(sweep, tmp_path / "one.jsonl", model_and_tokenizer=(model, tok), progress=False)
    out = tmp_path / "ray" / "results.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result, killed = {}, []
        runner = threading.Thread(target=lambda: result.update(records=run_cells_ray(
            cells, out, sweep.model, batch_size=sweep.batch_size, sweep_name=sweep.name, progress=False)))
        runner.start()
        deadline = time.time() + 240
        while runner.is_alive() and not killed and time.time() < deadline:
            for p in psutil.process_iter(["cmdline"]):
                if any("_cell_task" in part for part in (p.info["cmdline"] or [])):
                    time.sleep(0.3)  # into the cell
                    p.kill()
                    killed.append(p.pid)
                    break
            time.sleep(0.05)
        runner.join(timeout=600)
        assert killed, "no Ray worker was seen running a cell"
    finally:
        ray.shutdown()
    records = result["records"]
    assert read_results(out) == records
    keys = {c.key() for c in cells}
    assert set(_cells_by_key(records)) == keys
    _same_scores(records, [r for r in single if r.get("cell") in keys])
    prompts = [(r["cell"], r["index"]) for r in records if r["record"] == "sample"]
    assert len(prompts) == len(set(prompts)) == 2 * sum(c.kind == "task" for c in cells)


def test_torchrun_ranks_are_shards(sweep_setup, tmp_path):
    """Launched by torchrun, each rank runs its shard (no --shard given) and the results merge into one file."""
    path, model, tok = sweep_setup
    out = tmp_path / "results.jsonl"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "longattn.cli",
                          "sweep", str(path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = load_sweep(path)
    single = run_sweep(sweep, tmp_path / "one.jsonl", model_and_tokenizer=(model, tok), progress=False)
    _same_scores(read_results(out), single)
    assert not list(tmp_path.glob("results.shard-*"))
