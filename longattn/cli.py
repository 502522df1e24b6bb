"""The `longattn` command: methods, eval (perplexity, tasks), sweep, report, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .pretrained import DTYPES

DEMO_SWEEP = {
    "name": "demo",
    "description": "Both faces of sparsity on one model: perplexity with and without attention sinks, and pass-key "
                   "retrieval inside vs beyond a sliding window.",
    "seed": 0, "samples": 10, "batch_size": 1, "lengths": [1024], "tasks": ["passkey"], "filler": "grass",
    "methods": [{"method": "dense"}, {"method": "sliding_window", "grid": {"window": [256]}},
                {"method": "sink_window", "params": {"sink_tokens": 4}, "grid": {"window": [252, 508]}}],
    "perplexity": {"text": "licenses", "lengths": [2048], "tokens": 4096, "stride": 1024},
}


def parse_params(pairs: list[str], flag: str = "--param") -> dict:
    """NAME=VALUE items -> dict, values read as JSON where they parse as JSON (else kept as strings)."""
    params = {}
    for item in pairs or []:
        if "=" not in item:
            raise ValueError(f"{flag} expects NAME=VALUE, got {item!r}")
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

    infos = methods()
    groups = (("Attention methods (longattn.patch(model, method, ...)):", [i for i in infos if not i.model_edit]),
              ("\nModel edits (new trainable parameters; the call adds them, then patches):",
               [i for i in infos if i.model_edit]))
    for title, group in groups:
        print(title)
        for info in group:
            params = ", ".join(f"{k}={v!r}" for k, v in info.params.items()) or "-"
            edit = f"\n{'':16s} added by: {info.model_edit}" if info.model_edit else ""
            print(f"{info.name:16s} {info.summary}\n{'':16s} params: {params}\n{'':16s} paper: {info.paper}{edit}")
    print("\nKV-cache policies (longattn.patch(model, policy, kv_budget=...) or kv_cache={'policy': ...}):")
    for name, cls in sorted(POLICIES.items()):
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        print(f"{name:16s} {cls.summary}\n{'':16s} params: {params}\n{'':16s} paper: {cls.paper}")
    print(f"\nrecipes (patches/): {', '.join(recipe_names())}")
    return 0


def _model_setup(args) -> None:
    """Checks of --model / --device and the thread count (argparse checks --dtype), before anything loads."""
    import torch

    from .pretrained import check_model_spec, resolve_device

    if getattr(args, "model", None) is not None:
        check_model_spec(args.model)
    args.device = resolve_device(getattr(args, "device", None))
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _check_cells(cells) -> None:
    """Every cell's method, parameters, task and inputs, checked before the model loads."""
    from .evals.tasks import load_filler, make_task
    from .evals.texts import check_text_spec
    from .patching import resolve_kv_cache

    for c in cells:
        params = {k: v for k, v in c.params.items() if k != "kv_cache"}
        resolve_kv_cache(c.method, c.params.get("kv_cache"), params)
        if c.kind == "task":
            make_task(c.task, **c.task_params)
            if c.filler not in ("grass", "python-doc"):
                load_filler(c.filler)
        else:
            check_text_spec(c.text)


def _print_cell(r: dict) -> None:
    if r["kind"] == "perplexity":
        print(f"{r['method']} {r['params'] or ''} context={r['length']}: perplexity {r['perplexity']:.3f} "
              f"({r['scored_tokens']} tokens, density {r['density_prefill']:.3f}, {r['wall_s']:.1f}s)")
    else:
        lo, hi = r["score_ci95"]
        print(f"{r['task']} @ {r['length']} with {r['method']} {r['params'] or ''}: {r['metric']} {r['score']:.3f} "
              f"(95% CI {lo:.2f}-{hi:.2f}, n={r['n']}, prefill density {r['density_prefill']:.3f}, "
              f"{r['wall_s']:.1f}s)")


def _run_eval(args, cells) -> int:
    from .evals.sweep import run_cells

    _check_cells(cells)
    _model_setup(args)
    if args.out is None:
        print("longattn: no --out given: records are not kept (a run with --out resumes after a kill)")
    run_cells(cells, args.out, args.model, args.dtype, args.device, getattr(args, "batch_size", 1),
              echo=_print_cell)
    if args.out:
        print(f"records in {args.out}; `longattn report {args.out}` draws the tables and plots")
    return 0


def _cmd_eval_perplexity(args) -> int:
    from .evals.runner import Cell

    params = parse_params(args.param)
    cells = [Cell("perplexity", args.patch, ctx, params, args.layers, text=args.text, tokens=args.tokens,
                  stride=args.stride) for ctx in _ints(args.context)]
    return _run_eval(args, cells)


def _cmd_eval_tasks(args) -> int:
    from .evals.runner import Cell

    params, task_params = parse_params(args.param), parse_params(args.task_param, "--task-param")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    cells = [Cell("task", args.patch, length, params, args.layers, task, task_params, args.samples, args.seed,
                  args.filler, chat=args.chat)
             for task in args.tasks.split(",") for length in _ints(args.lengths)]
    return _run_eval(args, cells)


def _cmd_models(args) -> int:
    from .pretrained import describe_models

    for m in describe_models():
        if m["name"] == "reference":
            state = "shipped in the package" if m["installed"] else "missing from this checkout"
        elif m["installed"]:
            state = "installed, " + ("converted (cached)" if m["converted"] else "converted to safetensors on first load")
        else:
            state = f"not installed: {m['install']}"
        print(f"{m['name']:22s} {m['parameters']:>5s} parameters, {m['context']:>6,d}-token context, "
              f"{m['licence']}\n{'':22s} {m['summary']}\n{'':22s} {state}")
    return 0


def _sweep_shard(args):
    """The shard this process runs: --shard, else the launcher's rank (torchrun / accelerate launch), else None.
    Under a launcher each rank takes its own GPU (LOCAL_RANK) or its share of the CPU cores."""
    import os

    import torch

    from .evals.shards import parse_shard, shard_from_launcher

    if args.shard is not None:
        return parse_shard(args.shard)
    launched = shard_from_launcher()
    if launched is None:
        return None
    shard, local_rank = launched
    if args.device == "auto" and torch.cuda.is_available():
        args.device = f"cuda:{local_rank % torch.cuda.device_count()}"
    elif not args.threads:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", shard.count))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return shard


def _cmd_sweep(args) -> int:
    from .evals.report import markdown_table, write_report
    from .evals.shards import merge_results
    from .evals.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.file)
    if args.model is not None:
        sweep.model = args.model
    if args.ray is not None and (args.shard is not None or args.merge):
        raise ValueError("--ray runs every cell through Ray: it takes neither --shard nor --merge")
    out = args.out or Path("evals/results") / sweep.name / "results.jsonl"
    if args.merge:
        records = merge_results(out)
        print(f"merged into {out}: {sum(r.get('record', 'cell') == 'cell' for r in records)} cells")
    else:
        _model_setup(args)
        shard = _sweep_shard(args)
        if args.ray is not None:
            from .evals.ray_backend import run_cells_ray

            records = run_cells_ray(sweep.cells, out, sweep.model, args.dtype or sweep.dtype, args.device,
                                    sweep.batch_size, sweep.name, address=args.ray or None)
        else:
            records = run_sweep(sweep, out, dry_run=args.dry_run, dtype=args.dtype, device=args.device,
                                shard=shard)
        if args.dry_run:
            return 0
    keys = {c.key() for c in sweep.cells}
    finished = {r["cell"] for r in records if r.get("record", "cell") == "cell"}
    if keys <= finished:  # a shard whose peers are still running leaves the report to the last one
        print(markdown_table([r for r in records if r.get("sweep") == sweep.name]))
        for p in write_report(records, args.report_dir or out.parent, title=sweep.name):
            print(f"wrote {p}")
    return 0


def _cmd_inspect(args) -> int:
    """Head profiles (JSON + layer x head heatmaps) and attention maps of the most sink-like, local and retrieving
    heads on one needle prompt."""
    import torch

    from .evals.tasks import make_task
    from .evals.tasks.base import Filler, PromptFormat
    from .heads import attention_map, plot_attention_map, plot_profile, profile_heads
    from .pretrained import load_model

    tasks = [t for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        make_task(t)
    if args.maps < 0 or args.map_block < 1:
        raise ValueError("--maps must be >= 0 and --map-block >= 1")
    _model_setup(args)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    out = args.out_dir
    if args.profile is not None:  # drawn again from a saved profile (maps recomputed)
        from .heads import HeadProfile

        prof = HeadProfile.load(args.profile)
        args.length, args.chat = prof.settings.get("length", args.length), prof.settings.get("chat", args.chat)
        args.sink_tokens = prof.settings.get("sink_tokens", args.sink_tokens)
    else:
        prof = profile_heads(model, tok, length=args.length, samples=args.samples, sink_tokens=args.sink_tokens,
                             window=args.window, tasks=tasks, seed=args.seed, chat=args.chat)
        print(f"wrote {prof.save(out / 'profile.json')}")
    for p in plot_profile(prof, out) + plot_profile(prof, out, kv=True):
        print(f"wrote {p}")
    for name in ("sink", "non_first_sink", "local", "retrieval"):
        flat = sorted(((v, layer, h) for layer, row in zip(prof.layers, prof.scores[name]) for h, v in enumerate(row)),
                      reverse=True)[:5]
        print(f"top {name}: " + ", ".join(f"L{layer}.H{h}={v:.2f}" for v, layer, h in flat))
    if args.maps:
        s = make_task(tasks[0]).make(tok, args.map_length or args.length, seed=args.seed, filler=Filler(), depth=0.5,
                                     prompt=PromptFormat(args.chat))
        ids = torch.tensor([s.input_ids], device=next(model.parameters()).device)
        needle = s.meta["needle_spans"][0][0]
        picked = []
        for name in ("sink", "retrieval", "local", "non_first_sink"):
            best = max(((v, layer, h) for layer, row in zip(prof.layers, prof.scores[name]) for h, v in enumerate(row)
                        if (layer, h) not in [p[1:] for p in picked]), default=None)
            if best is not None and len(picked) < args.maps:
                picked.append((name, best[1], best[2]))
        for name, layer, head in picked:
            amap = attention_map(model, ids, layer, head, block=args.map_block)
            path = plot_attention_map(amap, out / f"map_L{layer}_H{head}.png",
                                      f"{prof.model}: layer {layer} head {head} (top {name} head), {tasks[0]} prompt",
                                      args.map_block, {"needle": needle, f"first {args.sink_tokens} tokens": 0})
            print(f"wrote {path}")
    return 0


def _cmd_gates(args) -> int:
    """DuoAttention's gate search: gates.json (a head profile with the score "gate"), its heatmaps and the loss
    curve; resumes from gates_state.pt in --out-dir."""
    from .duo import GateTraining, plot_gate_history, train_head_gates
    from .heads import plot_profile
    from .pretrained import load_model

    settings = GateTraining(length=args.length, samples=args.samples, steps=args.steps, lr=args.lr, l1=args.l1,
                            sink_tokens=args.sink_tokens, window=args.window, task=args.task, chat=args.chat,
                            seed=args.seed)
    settings.validate()
    _model_setup(args)
    model, tok = load_model(args.model, dtype="float32", device=args.device)
    prof = train_head_gates(model, tok, settings, state_path=args.out_dir / "gates_state.pt")
    print(f"wrote {prof.save(args.out_dir / 'gates.json')}")
    for p in plot_profile(prof, args.out_dir, kv=True) + [plot_gate_history(prof, args.out_dir / "gate_history.png")]:
        print(f"wrote {p}")
    flat = sorted(((v, layer, h) for layer, row in zip(prof.layers, prof.kv_scores["gate"]) for h, v in enumerate(row)),
                  reverse=True)
    print("highest gates (KV heads): " + ", ".join(f"L{layer}.KV{h}={v:.2f}" for v, layer, h in flat[:10]))
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
    import time

    from .evals.report import markdown_table, write_report
    from .evals.sweep import run_sweep, sweep_from_config
    from .pretrained import load_model

    _model_setup(args)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    chat = bool(getattr(tok, "chat_template", None)) if args.chat is None else args.chat
    cfg = dict(DEMO_SWEEP, samples=args.samples, model=args.model, dtype=args.dtype, chat=chat)
    sweep = sweep_from_config(cfg, "demo")
    out = args.out_dir / "results.jsonl"
    print(f"longattn demo: {len(sweep.cells)} cells on {args.model} ({args.dtype}, {args.device}"
          f"{', chat prompts' if chat else ''}) -> {args.out_dir}/")
    records = run_sweep(sweep, out, model_and_tokenizer=(model, tok), dtype=args.dtype, device=args.device)
    print(markdown_table(records))
    print(_demo_story(records))
    for p in write_report(records, args.out_dir, title="longattn demo"):
        print(f"wrote {p}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _demo_story(records: list[dict]) -> str:
    """The two findings the demo exists to show, in words, from its own records."""
    from .evals.report import config_label

    cells = [r for r in records if r.get("record", "cell") == "cell"]
    lines = ["", "Perplexity (every token scored once, 2048-token windows):"]
    for r in sorted((r for r in cells if r["kind"] == "perplexity"), key=lambda r: r["perplexity"]):
        lines.append(f"  {config_label(r):42s} {r['perplexity']:7.2f}   (attention density {r['density_prefill']:.2f})")
    lines.append("Pass key by needle depth (0 = start of the context, 1 = its end), found / missed:")
    samples = [r for r in records if r.get("record") == "sample"]
    for r in (r for r in cells if r["kind"] == "task"):
        mine = sorted((s for s in samples if s["cell"] == r["cell"]), key=lambda s: s["depth"])
        marks = " ".join(f"{s['depth']:.2f}:{'found' if s['score'] else 'miss'}" for s in mine)
        lines.append(f"  {config_label(r):42s} {r['score']:.2f}  {marks}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="longattn",
        description="Patch how Hugging Face causal LMs attend over long contexts, and measure the trade-offs.")
    ap.add_argument("--version", action="version", version=f"longattn {__import__('longattn').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("methods", help="list attention methods, their parameters and papers").set_defaults(
        func=_cmd_methods)
    sub.add_parser("models", help="models loadable by name: licence, size, context, installed or not").set_defaults(
        func=_cmd_models)

    ev = sub.add_parser("eval", help="evaluate a (patched) model").add_subparsers(dest="what", metavar="WHAT")

    def model_args(p, default="reference"):
        p.add_argument("--model", default=default, help="a name from `longattn models` "
                       "(reference, smollm2-135m-instruct, gemma3-270m) or a HF model folder")
        p.add_argument("--dtype", default=None if default is None else "float32", choices=DTYPES)
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (cuda when available)")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")

    def common(p):
        model_args(p)
        p.add_argument("--patch", default="dense", help="method name or recipe (name or .toml path)")
        p.add_argument("--param", action="append", metavar="NAME=VALUE", help="method parameter (repeatable)")
        p.add_argument("--layers", default=None, help="layers to patch: 'all', '2:' or '0,1'")
        p.add_argument("--out", type=Path, default=None, help="append records to this JSONL file")

    p = ev.add_parser("perplexity", help="strided sliding-window perplexity (a curve for several contexts)")
    common(p)
    p.add_argument("--context", default="2048", help="context length(s), comma-separated for a curve")
    p.add_argument("--stride", type=int, default=None, help="default: half the context")
    p.add_argument("--text", default="licenses", help="licenses, python-doc, linux-doc-heldout, a .txt/.jsonl/"
                                                      ".parquet file, or a datasets name")
    p.add_argument("--tokens", type=int, default=16384, help="score the first N tokens of the text")
    p.set_defaults(func=_cmd_eval_perplexity)

    p = ev.add_parser("tasks", help="long-context tasks (pass key, RULER family, LongBench JSONL)")
    common(p)
    p.add_argument("--tasks", default="passkey")
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filler", default="grass", help="grass, python-doc or a text file")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--task-param", action="append", metavar="NAME=VALUE",
                   help="task parameter, e.g. path=qa.jsonl for longbench, needles=8 (repeatable)")
    p.set_defaults(func=_cmd_eval_tasks)

    p = sub.add_parser("sweep", help="run a sweep file (resumes; --dry-run lists the cells)")
    p.add_argument("file", type=Path)
    model_args(p, default=None)
    p.add_argument("--out", type=Path, default=None, help="results JSONL (default evals/results/NAME/results.jsonl)")
    p.add_argument("--report-dir", type=Path, default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--shard", default=None, metavar="i/N", help="run shard i of N (every N-th cell) into its own "
                   "file; the last shard to finish merges them (default under torchrun / accelerate launch: the "
                   "process's rank)")
    p.add_argument("--merge", action="store_true", help="merge the shards' files into the results file and stop")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the cells as Ray tasks, one device each (a cluster address, or none for a local Ray)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="Markdown table and plots from a results JSONL")
    p.add_argument("results", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("inspect", help="what every head does: sink, local, entropy and retrieval scores per layer and "
                                       "head (JSON + heatmaps) and attention maps")
    model_args(p)
    p.add_argument("--length", type=int, default=2048, help="tokens per profiling prompt")
    p.add_argument("--samples", type=int, default=4, help="prompts per task (needle depths spread over the context)")
    p.add_argument("--tasks", default="passkey,niah_single", help="needle tasks whose answers score retrieval")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=256, help="what counts as local")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="prompts in the tokenizer's chat template")
    p.add_argument("--maps", type=int, default=3, help="attention maps of the top sink / retrieval / local heads")
    p.add_argument("--map-length", type=int, default=None, help="tokens of the map's prompt (default --length)")
    p.add_argument("--map-block", type=int, default=32, help="tokens per map cell")
    p.add_argument("--out-dir", type=Path, default=Path("longattn-heads"))
    p.add_argument("--profile", type=Path, default=None, help="a saved profile.json: draw it (and its maps) again")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("gates", help="DuoAttention's retrieval-head search: train one gate per KV head between full "
                                     "and sinks + window attention (model frozen, float32); head_hybrid uses the result")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a name from `longattn models` or a HF model folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--length", type=int, default=2048, help="tokens per training prompt")
    p.add_argument("--samples", type=int, default=16, help="training prompts (cycled)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--l1", type=float, default=0.05, help="weight of the mean gate in the loss")
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--task", default="niah_multivalue", help="needle task whose answers are distilled")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--chat", action="store_true", help="prompts in the tokenizer's chat template")
    p.add_argument("--out-dir", type=Path, default=Path("longattn-gates"))
    p.set_defaults(func=_cmd_gates)

    sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness with the 'longattn' model type: "
                   "longattn lm-eval --model longattn --model_args pretrained=NAME,patch=METHOD,patch_params=a=1;b=2 "
                   "--tasks ... (every other argument is lm_eval's)")

    p = sub.add_parser("demo", help="the main job: perplexity with and without sinks, retrieval inside and beyond "
                                    "a window, on SmolLM2 (2 minutes on 2 cores)")
    model_args(p, default="smollm2-135m-instruct")
    p.add_argument("--out-dir", type=Path, default=Path("longattn-demo"))
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="chat-template prompts (default: when the tokenizer has a template)")
    p.set_defaults(func=_cmd_demo)
    return ap


def _lm_eval(argv: list[str]) -> int:
    """lm-eval's own command line, with the "longattn" model type registered (lm-eval has no plugin discovery)."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ModuleNotFoundError:
        print("longattn: error: lm-eval is not installed: pip install 'longattn[lmeval]' (or pip install "
              "lm-eval)", file=sys.stderr)
        return 2
    from .evals import lmeval  # noqa: F401  (registers the model type)

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, so argparse does not see it
        return _lm_eval(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    try:
        if args.command == "eval" and args.layers and ":" not in args.layers and args.layers != "all":
            args.layers = _ints(args.layers)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"longattn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
