"""The `longattn` command: methods, eval (perplexity, tasks), sweep, report, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_SWEEP = {
    "name": "demo",
    "description": "Dense vs sliding windows on the embedded reference model: retrieval beyond the window.",
    "model": "reference", "seed": 0, "samples": 8, "batch_size": 8,
    "lengths": [1024, 2048, 4096], "tasks": ["passkey", "niah_single"], "filler": "grass",
    "methods": [{"method": "dense"}, {"method": "sliding_window", "grid": {"window": [256, 512, 1024]}}],
}


def _parse_params(pairs: list[str]) -> dict:
    params = {}
    for item in pairs or []:
        if "=" not in item:
            raise SystemExit(f"--param expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v  # a bare string such as backend=sdpa
    return params


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def _cmd_methods(args) -> int:
    import dataclasses

    from . import POLICIES, methods, recipe_names

    for info in methods():
        params = ", ".join(f"{k}={v!r}" for k, v in info.params.items()) or "-"
        print(f"{info.name:16s} {info.summary}\n{'':16s} params: {params}\n{'':16s} paper: {info.paper}")
    print("\nKV-cache policies (longattn.patch(model, policy, kv_budget=...) or kv_cache={'policy': ...}):")
    for name, cls in sorted(POLICIES.items()):
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"{name:16s} {cls.summary}\n{'':16s} params: {params}\n{'':16s} paper: {cls.paper}")
    print(f"\nrecipes (patches/): {', '.join(recipe_names())}")
    return 0


def _append(out: Path | None, records: list[dict]) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"appended {len(records)} record(s) to {out}")


def _cmd_eval_perplexity(args) -> int:
    from .evals.runner import Cell, Resources, run_cell
    from .evals.sweep import load_model

    model, tok, name = load_model(args.model)
    resources = Resources(tok)
    records = []
    for ctx in _ints(args.context):
        cell = Cell("perplexity", args.patch, ctx, _parse_params(args.param), args.layers, text=args.text,
                    tokens=args.tokens, stride=args.stride)
        r = run_cell(model, tok, cell, name, resources)
        print(f"{args.patch} context={ctx} stride={args.stride or ctx // 2}: perplexity {r['perplexity']:.3f} "
              f"({r['scored_tokens']} tokens, density {r['density_prefill']:.3f}, {r['wall_s']:.1f}s)")
        records.append(r)
    _append(args.out, records)
    return 0


def _cmd_eval_tasks(args) -> int:
    from .evals.runner import Cell, Resources, run_cell
    from .evals.sweep import load_model

    model, tok, name = load_model(args.model)
    resources = Resources(tok)
    records = []
    for task in args.tasks.split(","):
        for length in _ints(args.lengths):
            cell = Cell("task", args.patch, length, _parse_params(args.param), args.layers, task, {}, args.samples,
                        args.seed, args.filler)
            r = run_cell(model, tok, cell, name, resources, args.batch_size)
            print(f"{task} @ {length} with {args.patch}: {r['metric']} {r['score']:.3f} "
                  f"(density {r['density_prefill']:.3f}, {r['wall_s']:.1f}s)")
            records.append(r)
    _append(args.out, records)
    return 0


def _cmd_sweep(args) -> int:
    from .evals.report import markdown_table, write_report
    from .evals.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.file)
    out = args.out or Path("evals/results") / sweep.name / "results.jsonl"
    records = run_sweep(sweep, out, dry_run=args.dry_run)
    if not args.dry_run:
        print(markdown_table([r for r in records if r.get("sweep") == sweep.name]))
        for p in write_report(records, args.report_dir or out.parent, title=sweep.name):
            print(f"wrote {p}")
    return 0


def _cmd_report(args) -> int:
    from .evals.report import markdown_table, write_report
    from .evals.sweep import read_results

    records = read_results(args.results)
    if not records:
        raise SystemExit(f"{args.results}: no records")
    print(markdown_table(records))
    for p in write_report(records, args.out_dir or args.results.parent, title=args.title or args.results.parent.name):
        print(f"wrote {p}")
    return 0


def _cmd_demo(args) -> int:
    from .evals.report import markdown_table, write_report
    from .evals.sweep import run_sweep, sweep_from_config

    cfg = dict(DEMO_SWEEP, samples=args.samples)
    sweep = sweep_from_config(cfg, "demo")
    out = args.out_dir / "results.jsonl"
    print(f"longattn demo: {len(sweep.cells)} cells on the embedded reference model -> {args.out_dir}/")
    records = run_sweep(sweep, out)
    print(markdown_table(records))
    for p in write_report(records, args.out_dir, title="longattn demo (reference model)"):
        print(f"wrote {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="longattn",
        description="Patch how Hugging Face causal LMs attend over long contexts, and measure the trade-offs.")
    ap.add_argument("--version", action="version", version=f"longattn {__import__('longattn').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("methods", help="list attention methods, their parameters and papers").set_defaults(
        func=_cmd_methods)

    ev = sub.add_parser("eval", help="evaluate a (patched) model").add_subparsers(dest="what", metavar="WHAT")

    def common(p):
        p.add_argument("--model", default="reference", help="'reference' or a HF model folder")
        p.add_argument("--patch", default="dense", help="method name or recipe (name or .toml path)")
        p.add_argument("--param", action="append", metavar="NAME=VALUE", help="method parameter (repeatable)")
        p.add_argument("--layers", default=None, help="layers to patch: 'all', '2:' or '0,1'")
        p.add_argument("--out", type=Path, default=None, help="append records to this JSONL file")

    p = ev.add_parser("perplexity", help="strided sliding-window perplexity (a curve for several contexts)")
    common(p)
    p.add_argument("--context", default="2048", help="context length(s), comma-separated for a curve")
    p.add_argument("--stride", type=int, default=None, help="default: half the context")
    p.add_argument("--text", default="python-doc", help="python-doc, linux-doc-heldout, a .txt/.jsonl/.parquet "
                                                        "file, or a datasets name")
    p.add_argument("--tokens", type=int, default=16384, help="score the first N tokens of the text")
    p.set_defaults(func=_cmd_eval_perplexity)

    p = ev.add_parser("tasks", help="long-context tasks (pass key, RULER family, LongBench JSONL)")
    common(p)
    p.add_argument("--tasks", default="passkey")
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", default="grass", help="grass, python-doc or a text file")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_cmd_eval_tasks)

    p = sub.add_parser("sweep", help="run a sweep file (resumes; --dry-run lists the cells)")
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, default=None, help="results JSONL (default evals/results/NAME/results.jsonl)")
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="Markdown table and plots from a results JSONL")
    p.add_argument("results", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="the main job: a small sweep on the embedded reference model")
    p.add_argument("--out-dir", type=Path, default=Path("longattn-demo"))
    p.add_argument("--samples", type=int, default=8)
    p.set_defaults(func=_cmd_demo)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    if args.command == "eval" and args.layers and "," in args.layers:
        args.layers = [int(x) for x in args.layers.split(",")]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"longattn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
