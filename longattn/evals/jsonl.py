"""JSON-lines reading whose errors name the file and the line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError '<file>:<line>: ...' on a bad line."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object")
                yield lineno, rec
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: cannot read ({e})") from None
