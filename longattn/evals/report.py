"""Reports from results JSONL: Markdown tables with 95% intervals and PNG plots (score vs density, vs length, vs
KV budget, perplexity vs length, needle depth x length heatmaps), one panel per task, never averaged over tasks.

A results file holds cell records (one per measured cell; files written before sample records existed have no
"record" key) and sample records (one per prompt of a task cell, `"record": "sample"`). Every function here
takes the mixed list and picks what it needs.
"""
from __future__ import annotations

import hashlib
import math
import re
import textwrap
from collections import defaultdict
from pathlib import Path
from statistics import mean

from .metrics import mean_ci95

# tab10, spelled out so that styles need no matplotlib import (and stay fixed across matplotlib versions).
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
# All 80 (colour, marker) pairs, ordered so that consecutive labels change both colour and marker: i -> (i % 10,
# i % 8) gives 40 distinct pairs of equal parity, i -> (i % 10, (i + 1) % 8) the 40 of opposite parity.
STYLES = ([(COLOURS[i % 10], MARKERS[i % 8]) for i in range(40)]
          + [(COLOURS[i % 10], MARKERS[(i + 1) % 8]) for i in range(40)])
DEPTH_BINS = 10


def config_label(r: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items()) if k != "backend")
    layers = f" layers={r['layers']}" if r.get("layers") not in (None, "all") else ""
    return f"{r['method']}({params}){layers}" if params else f"{r['method']}{layers}"


def styles(labels) -> dict[str, tuple[str, str]]:
    """(colour, marker) per label, assigned in sorted order (dense first); pairs repeat only beyond len(STYLES)."""
    return {label: STYLES[i % len(STYLES)] for i, label in enumerate(sorted(set(labels), key=_config_order))}


def _cells(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("record", "cell") == "cell"]


def _samples(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("record") == "sample"]


def _n(r: dict):
    return r.get("n", r.get("samples"))


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _mb(x, digits=1):
    return "-" if x is None else f"{x / 2**20:.{digits}f}"


def _config_order(label: str):
    """Sort key: the dense baseline first, then numbers by value (window=32 before window=128)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", label)  # odd positions are the numbers
    return (label.split("(")[0] != "dense", [float(t) if i % 2 else t for i, t in enumerate(parts)])


def _samples_by_cell(records: list[dict]) -> dict[str, list[dict]]:
    by = defaultdict(list)
    for s in _samples(records):
        by[s["cell"]].append(s)
    return by


def cell_ci95(r: dict, samples_by_cell: dict[str, list[dict]]) -> tuple[float, float] | None:
    """A cell's 95% interval: its own score_ci95, else computed from its sample records, else None."""
    if r.get("score_ci95") is not None:
        return tuple(r["score_ci95"])
    rows = samples_by_cell.get(r.get("cell"), [])
    if not rows:
        return None
    # One record per prompt index: a resumed run may have written a prompt's record twice.
    scores = list({s.get("index", i): s["score"] for i, s in enumerate(rows)}.values())
    return mean_ci95(scores)[1:]


def _n_note(cells: list[dict]) -> str:
    ns = sorted({_n(r) for r in cells if _n(r) is not None})
    if not ns:
        return ""
    return f"n = {ns[0]} prompts per cell" if len(ns) == 1 else f"n = {ns[0]}-{ns[-1]} prompts per cell"


def _models(records: list[dict]) -> str:
    return ", ".join(sorted({str(r["model"]) for r in records if r.get("model")})) or "unknown model"


def summary_table(records: list[dict]) -> str:
    """One row per configuration: score per task and length, prefill (and decode) density at the longest
    length, and perplexity per context length."""
    cells = _cells(records)
    tasks = [r for r in cells if r.get("kind") == "task"]
    ppl = [r for r in cells if r.get("kind") == "perplexity"]
    task_names = sorted({r["task"] for r in tasks})
    task_lengths = {t: sorted({r["length"] for r in tasks if r["task"] == t}) for t in task_names}
    lengths = sorted({r["length"] for r in tasks})
    texts = sorted({r.get("text") for r in ppl}, key=str)
    contexts = sorted({r["length"] for r in ppl})
    configs = sorted({config_label(r) for r in tasks + ppl}, key=_config_order)
    decode = any(r.get("density_decode") is not None for r in tasks)

    head = ["method"] + [f"{t} @ {n}" for t in task_names for n in task_lengths[t]]
    if lengths:
        head += [f"prefill density @ {lengths[-1]}"] + ([f"decode density @ {lengths[-1]}"] if decode else [])
    # The text's name only when there are several: otherwise it is in the table of all cells.
    head += [f"ppl @ {n}" if len(texts) == 1 else f"ppl {text} @ {n}" for text in texts for n in contexts]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for c in configs:
        mine = [r for r in tasks if config_label(r) == c]
        row = [c]
        for t in task_names:
            for n in task_lengths[t]:
                xs = [r["score"] for r in mine if r["task"] == t and r["length"] == n]
                row.append(_fmt(mean(xs), 2) if xs else "-")
        if lengths:
            for key in ["density_prefill"] + (["density_decode"] if decode else []):
                ds = [r[key] for r in mine if r["length"] == lengths[-1] and r.get(key) is not None]
                row.append(_fmt(mean(ds)) if ds else "-")
        for text in texts:
            for n in contexts:
                xs = [r["perplexity"] for r in ppl if config_label(r) == c and r.get("text") == text
                      and r["length"] == n]
                row.append(f"{mean(xs):.1f}" if xs else "-")
        out.append("| " + " | ".join(row) + " |")
    notes = []
    if tasks:
        n_note = _n_note(tasks)
        notes.append(f"Scores per task ({n_note}); 95% intervals are in the table of all cells." if n_note
                     else "Scores per task; 95% intervals are in the table of all cells.")
    return "\n".join(out) + "\n" + "".join(f"\n{x}\n" for x in notes)


def markdown_table(records: list[dict]) -> str:
    """Every cell: task cells with their sample count, 95% interval, densities and costs; perplexity cells."""
    cells = _cells(records)
    by_cell = _samples_by_cell(records)
    tasks = sorted((r for r in cells if r.get("kind") == "task"),
                   key=lambda r: (r["task"], r["length"], _config_order(config_label(r))))
    ppl = sorted((r for r in cells if r.get("kind") == "perplexity"),
                 key=lambda r: (str(r.get("text")), r["length"], _config_order(config_label(r))))
    out = []
    if tasks:
        out += ["| task | length | method | n | score | 95% CI | prefill density | decode density | KV cache (MB) "
                "| tokens/s | peak mem (MB) | wall (s) |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in tasks:
            ci = cell_ci95(r, by_cell)
            n = _n(r)
            out.append(f"| {r['task']} | {r['length']} | {config_label(r)} | {'-' if n is None else n} | "
                       f"{_fmt(r.get('score'), 2)} | {'-' if ci is None else f'{ci[0]:.2f}-{ci[1]:.2f}'} | "
                       f"{_fmt(r.get('density_prefill'))} | {_fmt(r.get('density_decode'))} | "
                       f"{_mb(r.get('kv_cache_bytes'))} | {_fmt(r.get('tokens_per_s'), 0)} | "
                       f"{_mb(r.get('peak_mem_bytes'), 0)} | "
                       f"{_fmt(r.get('wall_s'), 1)} |")
    if ppl:
        out += ["", "| text | context | method | perplexity | prefill density | decode density | tokens/s "
                "| peak mem (MB) | wall (s) |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in ppl:
            out.append(f"| {r.get('text')} | {r['length']} | {config_label(r)} | {_fmt(r.get('perplexity'), 2)} | "
                       f"{_fmt(r.get('density_prefill'))} | {_fmt(r.get('density_decode'))} | "
                       f"{_fmt(r.get('tokens_per_s'), 0)} | "
                       f"{_mb(r.get('peak_mem_bytes'), 0)} | "
                       f"{_fmt(r.get('wall_s'), 1)} |")
    return "\n".join(out) + "\n"


def depth_bins(samples: list[dict], bins: int = DEPTH_BINS) -> dict[tuple[int, int], tuple[float, int]]:
    """{(depth bin, length): (mean score, count)} over the samples that have a needle depth."""
    acc = defaultdict(list)
    for s in samples:
        d = s.get("depth")
        if d is None:
            continue
        if not 0 <= d <= 1:
            raise ValueError(f"sample {s.get('cell')}#{s.get('index')}: depth {d} outside [0, 1]")
        # The epsilon keeps 0.3 (stored as 0.29999...) in the 30-40% bin; depth 1.0 goes to the last bin.
        acc[(min(int(d * bins + 1e-9), bins - 1), s["length"])].append(s["score"])
    return {k: (mean(v), len(v)) for k, v in acc.items()}


def depth_heatmap(samples: list[dict], out_path, title: str, bins: int = DEPTH_BINS) -> Path:
    """Needle-in-a-haystack picture: mean score per needle depth bin (rows, shallow on top) and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = depth_bins(samples, bins)
    lengths = sorted({n for _, n in cells})
    grid = np.full((bins, len(lengths)), np.nan)
    for (b, n), (m, _) in cells.items():
        grid[b, lengths.index(n)] = m
    cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="#d9d9d9")  # bins no sample fell in: grey
    fig, ax = plt.subplots(figsize=(1.8 + 1.0 * len(lengths), 5.2))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for (b, n), (m, count) in cells.items():
        # White on the dark ends of RdYlGn, black on its light middle.
        ax.text(lengths.index(n), b, f"{m:.2f}\nn={count}", ha="center", va="center", fontsize=6.5,
                color="white" if m < 0.2 or m > 0.8 else "black")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    step = 100 / bins
    ax.set_yticks(range(bins), [f"{b * step:.0f}-{(b + 1) * step:.0f}%" for b in range(bins)])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0% = start of the context)")
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04).set_label("mean score")
    return _save(fig, Path(out_path), plt)


def slug(text: str, max_len: int = 80) -> str:
    """A file-name-safe form of a label: lowercase [a-z0-9_=.-], a hash suffix when it had to be cut."""
    s = re.sub(r"_+", "_", re.sub(r"[^a-z0-9_=.-]", "_", text.lower())).strip("_")
    if len(s) > max_len:  # a cut label could collide with another one: the hash of the full label keeps it apart
        s = s[:max_len - 9].rstrip("_") + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return s


def write_report(records: list[dict], out_dir, title: str = "longattn sweep") -> list[Path]:
    """Write report.md and the plots into `out_dir`; returns the written paths, report.md first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = _cells(records)
    samples = _samples(records)
    by_cell = _samples_by_cell(records)
    tasks = [r for r in cells if r.get("kind") == "task"]
    ppl = [r for r in cells if r.get("kind") == "perplexity"]
    # One style per configuration for the whole report, so a line looks the same in every figure.
    style = styles(config_label(r) for r in cells + samples)
    written = []
    if tasks:
        written.append(_score_vs_density(tasks, by_cell, style, out_dir, title, plt))
        written.append(_score_vs_length(tasks, by_cell, style, out_dir, title, plt))
        if any(_kv_policy(r) for r in tasks):
            written.append(_score_vs_kv(tasks, by_cell, style, out_dir, title, plt))
    if ppl:
        written.append(_perplexity_vs_length(ppl, style, out_dir, title, plt))
    heatmaps = []
    groups = defaultdict(list)
    for s in samples:
        if s.get("depth") is not None:
            groups[(s["task"], config_label(s))].append(s)
    used = set()
    for (task, label), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], _config_order(kv[0][1]))):
        name = f"needle_{slug(task, 40)}_{slug(label)}"
        if name in used:  # two labels with the same slug: keep both files
            name += "_" + hashlib.sha1(label.encode()).hexdigest()[:8]
        used.add(name)
        heatmaps.append(depth_heatmap(rows, out_dir / f"{name}.png", f"{_models(rows)}: {task}, {label}"))

    md = out_dir / "report.md"
    images = "".join(f"\n![{p.stem}]({p.name})\n" for p in written)
    needles = ""
    if heatmaps:
        needles = ("\n## Needle depth x context length\n\nMean score of the prompts whose (first asked) needle "
                   "sits at each depth; grey: no prompt there.\n"
                   + "".join(f"\n![{p.stem}]({p.name})\n" for p in heatmaps))
    md.write_text(f"# {title}\n\nModel: {_models(cells)}\n\n## Summary\n\n{summary_table(records)}{images}"
                  f"{needles}\n## All cells\n\n{markdown_table(records)}")
    return [md] + written + heatmaps


def _kv_policy(r: dict) -> str | None:
    """The KV-cache policy of a record: its method when that is a policy, or its kv_cache parameter."""
    from ..kvcache import POLICIES

    if r["method"] in POLICIES:
        return r["method"]
    kv = (r.get("params") or {}).get("kv_cache")
    return None if kv is None else (kv if isinstance(kv, str) else kv.get("policy"))


def _kv_fraction(r: dict) -> float:
    """The share of the context a record's KV policy may keep: kv_budget / length, else 1 - compression_ratio."""
    params = r.get("params") or {}
    kv = params.get("kv_cache") if isinstance(params.get("kv_cache"), dict) else params
    if kv.get("kv_budget") is not None:
        return min(1.0, kv["kv_budget"] / r["length"])
    if kv.get("compression_ratio") is not None:
        return 1 - kv["compression_ratio"]
    return 1.0


def _point(rs: list[dict], by_cell) -> tuple[float, float | None, float | None]:
    """Score and 95% interval of the records of one (task, configuration, length)."""
    score = mean(r["score"] for r in rs)
    if len(rs) != 1:  # several records of one cell (two sweeps in one file): their intervals do not combine
        return score, None, None
    ci = cell_ci95(rs[0], by_cell)
    return (score, None, None) if ci is None else (score, ci[0], ci[1])


def _draw(ax, xs, pts, colour, marker, hollow=False, line=True):
    """Points with their 95% intervals as error bars (where known), optionally joined by a line."""
    ys = [p[0] for p in pts]
    err = [[max(0.0, p[0] - p[1]) if p[1] is not None else 0.0 for p in pts],
           [max(0.0, p[2] - p[0]) if p[2] is not None else 0.0 for p in pts]]
    ax.errorbar(xs, ys, yerr=err, color=colour, marker=marker, markersize=6, linestyle="-" if line else "none",
                linewidth=1.2, capsize=2.5, elinewidth=0.9, alpha=0.9,
                markerfacecolor="none" if hollow else colour, markeredgewidth=1.3 if hollow else 0.8)


def _legend(fig, ax, style, entries):
    """One legend entry per configuration, to the right of the axes (never over the data)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style[label][0], marker=style[label][1], linestyle="-",
                      markerfacecolor="none" if hollow else style[label][0], markeredgewidth=1.3 if hollow else 0.8,
                      label=text) for label, text, hollow in entries]
    # Called after tight_layout (which would shrink the panels to make room); savefig's tight bbox takes it in.
    ax.legend(handles=handles, bbox_to_anchor=(1.02, 1), loc="upper left", borderaxespad=0, fontsize=8,
              title="configuration", title_fontsize=8)


def _suptitle(fig, title, what, records):
    n = _n_note(records)
    fig.suptitle(f"{title}: {what}\n{_models(records)}" + (f", {n}" if n else ""), fontsize=10)


def _metric(tasks, task):
    ms = sorted({r.get("metric") for r in tasks if r["task"] == task and r.get("metric")})
    return f"score ({', '.join(ms)})" if ms else "score"


def _by_label(records, task: str, length: int) -> dict[str, list[dict]]:
    """The records of one panel (task, length), grouped by configuration."""
    groups = defaultdict(list)
    for r in records:
        if r["task"] == task and r["length"] == length:
            groups[config_label(r)].append(r)
    return groups


def _grid(plt, rows, cols, w=3.4, h=2.9, **kw):
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 0.6, h * rows + 0.9), squeeze=False, **kw)
    return fig, axes


def _score_vs_density(tasks, by_cell, style, out_dir: Path, title: str, plt) -> Path:
    """Score vs density per task (rows) and length (columns); KV-policy cells at their decode density, hollow."""
    task_names = sorted({r["task"] for r in tasks})
    lengths = sorted({r["length"] for r in tasks})
    fig, axes = _grid(plt, len(task_names), len(lengths), sharex=True, sharey=True)
    entries = {}
    for i, task in enumerate(task_names):
        for j, length in enumerate(lengths):
            ax = axes[i][j]
            groups = _by_label(tasks, task, length)
            frontier, at = defaultdict(list), {}
            for label, rs in sorted(groups.items()):
                kv = _kv_policy(rs[0])
                if kv:  # a KV policy attends to all it keeps while prefilling: its sparsity is in decoding
                    xs = [r["density_decode"] if r.get("density_decode") is not None else _kv_fraction(r)
                          for r in rs]
                else:
                    xs = [r["density_prefill"] for r in rs if r.get("density_prefill") is not None]
                if xs:
                    at[label] = (mean(xs), kv, rs)
            for label, (x, kv, rs) in at.items():
                # Configurations at (nearly) the same density: shift their marks apart so no error bar hides another.
                near = sorted((k for k, v in at.items() if abs(v[0] - x) < 0.02), key=_config_order)
                shift = 0.015 * (near.index(label) - (len(near) - 1) / 2)
                p = _point(rs, by_cell)
                _draw(ax, [x + shift], [p], *style[label], hollow=bool(kv), line=False)
                frontier[(rs[0]["method"], kv)].append((x, p[0]))
                entries[label] = (label, label + " (decode density)" if kv else label, bool(kv))
            for pts in frontier.values():  # a method's parameter values, joined thinly: its frontier
                if len(pts) > 1:
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", linewidth=0.8, zorder=0)
            ax.set_title(f"{task} @ {length}", fontsize=9)
            ax.set_xlim(-0.03, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(_metric(tasks, task))
            if i == len(task_names) - 1:
                ax.set_xlabel("density: prefill (filled)\nor decode, KV policies (hollow)", fontsize=8)
    _suptitle(fig, title, "score vs attention density (attended / causal pairs), 95% CI", tasks)
    fig.tight_layout()
    _legend(fig, axes[0][-1], style, [entries[k] for k in sorted(entries, key=_config_order)])
    return _save(fig, out_dir / "score_vs_density.png", plt)


def _dodge(k: int, i: int, width: float = 0.25) -> float:
    """Multiplicative x offset for the i-th of k lines on a log axis, so their error bars do not hide each other."""
    return 2 ** ((i - (k - 1) / 2) * width / max(k - 1, 1)) if k > 1 else 1.0


def _score_vs_length(tasks, by_cell, style, out_dir: Path, title: str, plt) -> Path:
    """Score vs context length, one panel per task, one line per configuration."""
    task_names = sorted({r["task"] for r in tasks})
    lengths = sorted({r["length"] for r in tasks})
    cols = min(len(task_names), 3)
    rows = math.ceil(len(task_names) / cols)
    fig, axes = _grid(plt, rows, cols, w=4.4, h=3.3, sharey=True)
    labels = sorted({config_label(r) for r in tasks}, key=_config_order)
    for k, task in enumerate(task_names):
        ax = axes[k // cols][k % cols]
        for i, label in enumerate(labels):
            by_len = defaultdict(list)
            for r in tasks:
                if r["task"] == task and config_label(r) == label:
                    by_len[r["length"]].append(r)
            xs = sorted(by_len)
            if xs:
                _draw(ax, [x * _dodge(len(labels), i) for x in xs], [_point(by_len[x], by_cell) for x in xs],
                      *style[label], hollow=bool(_kv_policy(by_len[xs[0]][0])))
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(_metric(tasks, task))
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(task, fontsize=9)
    for k in range(len(task_names), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    _suptitle(fig, title, "score vs context length, 95% CI", tasks)
    fig.tight_layout()
    _legend(fig, axes[0][cols - 1], style,
            [(label, label, bool(_kv_policy(next(r for r in tasks if config_label(r) == label)))) for label in labels])
    return _save(fig, out_dir / "score_vs_length.png", plt)


def _score_vs_kv(tasks, by_cell, style, out_dir: Path, title: str, plt) -> Path:
    """Score vs the KV budget (share of the context kept per layer and KV head) per task (rows) and length
    (columns): KV-policy cells, and dense as the full-cache reference; attention-only methods set no budget."""
    shown = [r for r in tasks if _kv_policy(r) or r["method"] == "dense"]
    task_names = sorted({r["task"] for r in shown})
    lengths = sorted({r["length"] for r in shown})
    fig, axes = _grid(plt, len(task_names), len(lengths), sharex=True, sharey=True)
    entries = {}
    labels = sorted({config_label(r) for r in shown}, key=_config_order)
    for i, task in enumerate(task_names):
        for j, length in enumerate(lengths):
            ax = axes[i][j]
            groups = _by_label(shown, task, length)
            lines = defaultdict(list)
            for label, rs in sorted(groups.items()):
                kv = _kv_policy(rs[0])
                # Policies at one budget share an x: dodge them so that their error bars stay apart.
                x = (_kv_fraction(rs[0]) if kv else 1.0) * _dodge(len(labels), labels.index(label))
                p = _point(rs, by_cell)
                _draw(ax, [x], [p], *style[label], hollow=bool(kv), line=False)
                lines[(rs[0]["method"], kv)].append((x, p[0]))
                entries[label] = (label, label, bool(kv))
            for pts in lines.values():  # one policy through its budgets
                if len(pts) > 1:
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", linewidth=0.8, zorder=0)
            ax.set_xscale("log", base=2)
            budgets = sorted({_kv_fraction(r) if _kv_policy(r) else 1.0 for r in shown})
            ax.set_xticks(budgets, [f"{b:.0%}" if b >= 0.1 else f"{b:.1%}" for b in budgets], fontsize=8)
            ax.minorticks_off()
            ax.set_title(f"{task} @ {length}", fontsize=9)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(_metric(shown, task))
            if i == len(task_names) - 1:
                ax.set_xlabel("KV budget (share of the context kept)", fontsize=8)
    _suptitle(fig, title, "score vs KV budget, 95% CI", shown)
    fig.tight_layout()
    _legend(fig, axes[0][-1], style, [entries[k] for k in sorted(entries, key=_config_order)])
    return _save(fig, out_dir / "score_vs_kv_budget.png", plt)


def _perplexity_vs_length(ppl, style, out_dir: Path, title: str, plt) -> Path:
    """Perplexity vs context window, one panel per text, one line per configuration."""
    texts = sorted({str(r.get("text")) for r in ppl})
    contexts = sorted({r["length"] for r in ppl})
    fig, axes = _grid(plt, 1, len(texts), w=5.0, h=3.6)
    labels = sorted({config_label(r) for r in ppl}, key=_config_order)
    for ax, text in zip(axes[0], texts):
        for label in labels:
            by_len = defaultdict(list)
            for r in ppl:
                if str(r.get("text")) == text and config_label(r) == label:
                    by_len[r["length"]].append(r["perplexity"])
            xs = sorted(by_len)
            if xs:
                colour, marker = style[label]
                ax.plot(xs, [mean(by_len[x]) for x in xs], color=colour, marker=marker, linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [str(x) for x in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context window (tokens)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.set_title(f"text: {Path(text).name}", fontsize=9)
    fig.suptitle(f"{title}: perplexity vs context length\n{_models(ppl)}", fontsize=10)
    fig.tight_layout()
    _legend(fig, axes[0][-1], style, [(label, label, False) for label in labels])
    return _save(fig, out_dir / "perplexity_vs_length.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
