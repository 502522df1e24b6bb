"""Reports from results JSONL: a Markdown table and PNG plots (score vs density, score vs length, perplexity
vs length)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean


def config_label(r: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(r.get("params", {}).items()) if k != "backend")
    layers = f" layers={r['layers']}" if r.get("layers") not in (None, "all") else ""
    return f"{r['method']}({params}){layers}" if params else f"{r['method']}{layers}"


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(records: list[dict]) -> str:
    """One row per configuration: mean task score per length, prefill density at the longest length, and
    perplexity per context length."""
    tasks = [r for r in records if r.get("kind") == "task"]
    ppl = [r for r in records if r.get("kind") == "perplexity"]
    lengths = sorted({r["length"] for r in tasks})
    contexts = sorted({r["length"] for r in ppl})
    configs = sorted({config_label(r) for r in tasks + ppl}, key=lambda c: (c.split("(")[0] != "dense", c))
    head = (["method"] + [f"score @ {n}" for n in lengths] + ([f"density @ {lengths[-1]}"] if lengths else [])
            + [f"ppl @ {n}" for n in contexts])
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for c in configs:
        row = [c]
        for n in lengths:
            xs = [r["score"] for r in tasks if config_label(r) == c and r["length"] == n]
            row.append(_fmt(mean(xs), 2) if xs else "-")
        if lengths:
            ds = [r["density_prefill"] for r in tasks if config_label(r) == c and r["length"] == lengths[-1]]
            row.append(_fmt(mean(ds)) if ds else "-")
        for n in contexts:
            xs = [r["perplexity"] for r in ppl if config_label(r) == c and r["length"] == n]
            row.append(f"{xs[0]:.1f}" if xs else "-")
        out.append("| " + " | ".join(row) + " |")
    task_names = ", ".join(sorted({r["task"] for r in tasks}))
    note = f"\nScores are means over {task_names}.\n" if tasks else ""
    return "\n".join(out) + "\n" + note


def markdown_table(records: list[dict]) -> str:
    tasks = sorted((r for r in records if r.get("kind") == "task"),
                   key=lambda r: (r["task"], r["length"], config_label(r)))
    ppl = sorted((r for r in records if r.get("kind") == "perplexity"), key=lambda r: (r["length"], config_label(r)))
    out = []
    if tasks:
        out += ["| task | length | method | score | density | KV cache (MB) | tokens/s | peak mem (MB) | wall (s) |",
                "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in tasks:
            out.append(f"| {r['task']} | {r['length']} | {config_label(r)} | {_fmt(r['score'], 2)} | "
                       f"{_fmt(r.get('density_prefill'))} | {r.get('kv_cache_bytes', 0) / 2**20:.1f} | "
                       f"{r['tokens_per_s']:.0f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} |")
    if ppl:
        out += ["", "| text | context | method | perplexity | density | tokens/s | wall (s) |",
                "|---|---:|---|---:|---:|---:|---:|"]
        for r in ppl:
            out.append(f"| {r['text']} | {r['length']} | {config_label(r)} | {r['perplexity']:.2f} | "
                       f"{_fmt(r.get('density_prefill'))} | {r['tokens_per_s']:.0f} | {r['wall_s']:.1f} |")
    return "\n".join(out) + "\n"


def write_report(records: list[dict], out_dir, title: str = "longattn sweep") -> list[Path]:
    """Write report.md and the plots into `out_dir`; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    tasks = [r for r in records if r.get("kind") == "task"]
    ppl = [r for r in records if r.get("kind") == "perplexity"]
    task_names = sorted({r["task"] for r in tasks})

    if tasks:
        # Score vs density at each length: the frontier, one line per method through its parameter values.
        lengths = sorted({r["length"] for r in tasks})
        fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.8), squeeze=False, sharey=True)
        for ax, length in zip(axes[0], lengths):
            by_method = defaultdict(list)
            cells = defaultdict(list)
            for r in tasks:
                if r["length"] == length:
                    cells[(r["method"], config_label(r))].append(r)
            for (method, label), rs in cells.items():
                by_method[method].append((mean(x["density_prefill"] for x in rs), mean(x["score"] for x in rs), label))
            for method, pts in sorted(by_method.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            ax.set_title(f"{length} tokens")
            ax.set_xlabel("attention density (attended / causal pairs)")
            ax.set_xlim(0, 1.05)
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"mean score ({', '.join(task_names)})")
        axes[0][-1].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"{title}: score vs attention density")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "score_vs_density.png", plt))

        # Score vs context length, one line per configuration.
        fig, ax = plt.subplots(figsize=(7, 4.2))
        cells = defaultdict(lambda: defaultdict(list))
        for r in tasks:
            cells[config_label(r)][r["length"]].append(r["score"])
        for label, by_len in sorted(cells.items()):
            xs = sorted(by_len)
            ax.plot(xs, [mean(by_len[x]) for x in xs], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["length"] for r in tasks}), [str(x) for x in sorted({r["length"] for r in tasks})])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"mean score ({', '.join(task_names)})")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{title}: score vs context length")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "score_vs_length.png", plt))

    compressed = [r for r in tasks if _kv_policy(r)]
    if compressed:
        written.append(_score_vs_kv(tasks, out_dir, title, task_names, plt))

    if ppl:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        cells = defaultdict(dict)
        for r in ppl:
            cells[config_label(r)][r["length"]] = r["perplexity"]
        for label, by_len in sorted(cells.items()):
            xs = sorted(by_len)
            ax.plot(xs, [by_len[x] for x in xs], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["length"] for r in ppl}), [str(x) for x in sorted({r["length"] for r in ppl})])
        ax.set_xlabel("context window (tokens)")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"{title}: perplexity vs context length")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "perplexity_vs_length.png", plt))

    md = out_dir / "report.md"
    images = "".join(f"\n![{p.stem}]({p.name})\n" for p in written)
    md.write_text(f"# {title}\n\n## Summary\n\n{summary_table(records)}{images}\n## All cells\n\n"
                  f"{markdown_table(records)}")
    return [md] + written


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


def _score_vs_kv(tasks, out_dir: Path, title: str, task_names, plt) -> Path:
    """Score vs the KV budget (share of the context kept per layer and KV head), one line per policy."""
    lengths = sorted({r["length"] for r in tasks})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        lines = defaultdict(lambda: defaultdict(list))
        for r in tasks:
            if r["length"] == length:
                lines[_kv_policy(r) or config_label(r)][_kv_fraction(r)].append(r["score"])
        for name, pts in sorted(lines.items()):
            xs = sorted(pts)
            ax.plot(xs, [mean(pts[x]) for x in xs], "o-" if len(xs) > 1 else "*", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{length} tokens")
        ax.set_xlabel("KV budget (share of the context kept)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean score ({', '.join(task_names)})")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}: score vs KV budget", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir / "score_vs_kv_budget.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
