"""The `longattn` command."""
from __future__ import annotations

import argparse
import sys


def _cmd_methods(args) -> int:
    from . import methods, recipe_names

    for info in methods():
        params = ", ".join(f"{k}={v!r}" for k, v in info.params.items()) or "-"
        print(f"{info.name:16s} {info.summary}\n{'':16s} params: {params}\n{'':16s} paper: {info.paper}")
    print(f"\nrecipes (patches/): {', '.join(recipe_names())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="longattn",
        description="Patch how Hugging Face causal LMs attend over long contexts, and measure the trade-offs.")
    ap.add_argument("--version", action="version", version=f"longattn {__import__('longattn').__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("methods", help="list attention methods, their parameters and papers").set_defaults(
        func=_cmd_methods)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
