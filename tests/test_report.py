"""Reports: 95% intervals (Wilson for 0/1 scores) checked against the closed form, tables that skip sample
records, one style per configuration, needle depth bins, and the files write_report makes."""
import math
import random

import pytest

from longattn.evals.metrics import mean_ci95
from longattn.evals.report import (cell_ci95, config_label, depth_bins, markdown_table, slug, styles, summary_table,
                                   write_report)

Z = 1.96
CONFIGS = [("dense", {}, [1, 1, 1, 0]), ("sliding_window", {"window": 256}, [1, 0, 0, 0]),
           ("snapkv", {"kv_budget": 256}, [1, 1, 0, 0])]
DEPTHS = [0.0, 0.35, 0.7, 1.0]


def wilson(k, n):
    """Wilson's interval, written out from the formula (not from the code under test)."""
    p = k / n
    centre = p + Z * Z / (2 * n)
    spread = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return (centre - spread) / (1 + Z * Z / n), (centre + spread) / (1 + Z * Z / n)


def make_records():
    """Cells and their samples: 2 tasks (passkey with needle depths, common_words without), 3 configurations, 2
    lengths, 4 prompts each; one cell carries its own interval, the others leave it to the samples."""
    records = []
    for method, params, scores in CONFIGS:
        for task in ("passkey", "common_words"):
            for length in (1024, 2048):
                key = f"{method}|{params}|{task}|{length}"
                base = {"method": method, "params": params, "layers": None, "task": task, "length": length,
                        "model": "smollm2-135m-instruct"}
                cell = {"record": "cell", "cell": key, "kind": "task", **base, "score": sum(scores) / 4,
                        "metric": "string_match_all", "n": 4,
                        "density_prefill": 1.0 if method != "sliding_window" else 0.25,
                        "density_decode": 0.125 if method == "snapkv" and length == 2048 else None,
                        "kv_cache_bytes": 3 * 2**20, "tokens_per_s": 1000.0, "peak_mem_bytes": 500 * 2**20,
                        "wall_s": 2.5}
                if (method, task, length) == ("sliding_window", "common_words", 2048):
                    cell["score_ci95"] = [0.11, 0.99]
                records.append(cell)
                for i, (sc, d) in enumerate(zip(scores, DEPTHS)):
                    records.append({"record": "sample", "cell": key, "index": i, **base,
                                    "depth": d if task == "passkey" else None, "answers": ["1"],
                                    "prediction": "1" if sc else "2", "score": float(sc), "scores": {}, "chat": True})
    records.append({"record": "cell", "cell": "ppl", "kind": "perplexity", "method": "dense", "params": {},
                    "layers": None, "length": 1024, "model": "smollm2-135m-instruct", "score": 12.5,
                    "perplexity": 12.5, "text": "python-doc", "n": 1, "density_prefill": 1.0, "density_decode": None,
                    "tokens_per_s": 900.0, "peak_mem_bytes": 2**28, "wall_s": 1.0})
    return records


def test_mean_ci95_wilson_for_binary_scores():
    m, lo, hi = mean_ci95([1, 1, 1, 0])
    assert m == 0.75 and (lo, hi) == pytest.approx(wilson(3, 4), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.3006, 0.9544), abs=1e-4)  # the published value for 3 of 4
    m, lo, hi = mean_ci95([1.0])  # one prompt: a wide, honest interval, not (1, 1)
    assert m == 1.0 and hi == 1.0 and lo == pytest.approx(wilson(1, 1)[0]) and lo < 0.25
    assert mean_ci95([0, 0, 0, 0, 0])[1:] == pytest.approx((0.0, wilson(0, 5)[1]))


def test_mean_ci95_graded_scores():
    m, lo, hi = mean_ci95([0.5, 0.7, 0.9])  # sample sd 0.2
    assert m == pytest.approx(0.7)
    assert (lo, hi) == pytest.approx((0.7 - Z * 0.2 / math.sqrt(3), 0.7 + Z * 0.2 / math.sqrt(3)))
    assert mean_ci95([0.0, 0.1]) == pytest.approx((0.05, 0.0, 0.05 + Z * math.sqrt(0.005) / math.sqrt(2)))
    assert mean_ci95([0.4]) == (0.4, 0.0, 1.0)
    with pytest.raises(ValueError, match="no scores"):
        mean_ci95([])


def test_cell_interval_sources():
    records = make_records()
    by_cell = {}
    for s in records:
        if s.get("record") == "sample":
            by_cell.setdefault(s["cell"], []).append(s)
    cells = {(r["method"], r.get("task"), r["length"]): r for r in records if r["record"] == "cell"}
    assert cell_ci95(cells["dense", "passkey", 1024], by_cell) == pytest.approx(wilson(3, 4))
    assert cell_ci95(cells["sliding_window", "common_words", 2048], by_cell) == (0.11, 0.99)  # its own wins
    assert cell_ci95({"cell": "old", "score": 0.5}, by_cell) is None


def test_markdown_table_rows_and_intervals():
    records = make_records()
    table = markdown_table(records)
    lines = table.splitlines()
    assert lines[0].startswith("| task | length | method | n | score | 95% CI | prefill density | decode density |")
    rows = [line for line in lines if line.startswith(("| passkey |", "| common_words |"))]
    assert len(rows) == 12  # 2 tasks x 3 configurations x 2 lengths; the 48 sample records are not cells
    lo, hi = wilson(3, 4)
    assert f"| passkey | 1024 | dense | 4 | 0.75 | {lo:.2f}-{hi:.2f} | 1.000 | - | 3.0 | 1000 | 500 | 2.5 |" in rows
    lo, hi = wilson(1, 4)
    assert f"| passkey | 2048 | sliding_window(window=256) | 4 | 0.25 | {lo:.2f}-{hi:.2f} | 0.250 | - |" in table
    assert "| common_words | 2048 | sliding_window(window=256) | 4 | 0.25 | 0.11-0.99 |" in table
    assert "| snapkv(kv_budget=256) | 4 | 0.50 | " in table and "| 1.000 | 0.125 |" in table
    assert "| python-doc | 1024 | dense | 12.50 | 1.000 | - | 900 | 256 | 1.0 |" in table
    # An old record: no "record", "samples" instead of "n", no interval and no samples.
    old = {"cell": "x", "kind": "task", "method": "dense", "params": {}, "task": "passkey", "length": 512,
           "score": 0.5, "samples": 6, "density_prefill": 1.0, "kv_cache_bytes": 0, "tokens_per_s": 10.0,
           "peak_mem_bytes": 0, "wall_s": 1.0}
    assert "| passkey | 512 | dense | 6 | 0.50 | - | 1.000 | - |" in markdown_table([old])


def test_summary_table_per_task():
    records = make_records()
    table = summary_table(records)
    lines = table.splitlines()
    assert lines[0] == ("| method | common_words @ 1024 | common_words @ 2048 | passkey @ 1024 | passkey @ 2048 "
                        "| prefill density @ 2048 | decode density @ 2048 | ppl @ 1024 |")
    assert lines[2] == "| dense | 0.75 | 0.75 | 0.75 | 0.75 | 1.000 | - | 12.5 |"  # dense first
    assert "| snapkv(kv_budget=256) | 0.50 | 0.50 | 0.50 | 0.50 | 1.000 | 0.125 | - |" in lines
    assert len([x for x in lines if x.startswith("| ") and "method" not in x]) == 3
    assert "n = 4 prompts per cell" in table
    records[0]["n"] = 20
    assert "n = 4-20 prompts per cell" in summary_table(records)


def test_styles_are_distinct():
    labels = [f"sliding_window(window={32 * i})" for i in range(1, 20)] + ["dense"]
    style = styles(labels)
    assert len(set(style.values())) == 20
    assert style["dense"] == ("#1f77b4", "o")  # the baseline always looks the same
    shuffled = labels[:]
    random.Random(0).shuffle(shuffled)
    assert styles(shuffled) == style  # by sorted label, not by the order records come in
    assert len(set(styles(f"m(x={i})" for i in range(80)).values())) == 80


def test_depth_bins():
    samples = [{"depth": 0.0, "length": 1024, "score": 1.0}, {"depth": 0.05, "length": 1024, "score": 0.0},
               {"depth": 0.3, "length": 1024, "score": 1.0}, {"depth": 0.99, "length": 1024, "score": 1.0},
               {"depth": 1.0, "length": 1024, "score": 0.0}, {"depth": 0.55, "length": 2048, "score": 0.5},
               {"depth": None, "length": 2048, "score": 1.0}]
    assert depth_bins(samples) == {(0, 1024): (0.5, 2), (3, 1024): (1.0, 1), (9, 1024): (0.5, 2),
                                   (5, 2048): (0.5, 1)}
    assert depth_bins(samples, bins=2) == {(0, 1024): (2 / 3, 3), (1, 1024): (0.5, 2), (1, 2048): (0.5, 1)}
    with pytest.raises(ValueError, match="depth 1.5 outside"):
        depth_bins([{"depth": 1.5, "length": 1, "score": 1.0}])


def test_slug():
    assert slug("snapkv(kv_budget=256)") == "snapkv_kv_budget=256"
    assert slug("sliding_window(kv_cache={'policy': 'H2O'}, window=64)") == "sliding_window_kv_cache=_policy_h2o_window=64"
    a, b = slug("x" * 100 + "a"), slug("x" * 100 + "b")
    assert len(a) <= 80 and a != b


def test_write_report(tmp_path):
    records = make_records()
    written = write_report(records, tmp_path / "r", title="demo")
    names = [p.name for p in written]
    needles = [f"needle_passkey_{s}.png" for s in ("dense", "sliding_window_window=256", "snapkv_kv_budget=256")]
    assert names == ["report.md", "score_vs_density.png", "score_vs_length.png", "score_vs_kv_budget.png",
                     "perplexity_vs_length.png"] + needles  # common_words has no needle: no heatmap
    assert all(p.exists() and p.stat().st_size > 1000 for p in written)
    md = written[0].read_text()
    assert all(f"]({n})" in md for n in names[1:])
    assert "smollm2-135m-instruct" in md and "| 95% CI |" in md
    lo, hi = wilson(3, 4)
    assert f"{lo:.2f}-{hi:.2f}" in md
    assert config_label(records[0]) == "dense"
