"""Evaluation text through `datasets`: local text / JSONL / parquet files, a dataset name, or built-ins."""
from __future__ import annotations

from pathlib import Path

BUILTINS = ("python-doc", "linux-doc-heldout")


def load_text(spec: str, field: str = "text", split: str = "train") -> str:
    """One long string from `spec`.

    "python-doc" (Python documentation prose, never seen by the reference model), "linux-doc-heldout" (the
    kernel documentation files held out of the reference model's training), a local .txt / .jsonl / .json /
    .parquet file (records joined by blank lines; `field` names the text column), or a `datasets` name.
    """
    if spec == "python-doc":
        from .corpora import python_doc_prose

        return python_doc_prose()
    if spec == "linux-doc-heldout":
        from .corpora import linux_doc_heldout

        return linux_doc_heldout()
    import datasets

    path = Path(spec)
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{path}: expected a file, got a directory")
        builder = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet"}.get(path.suffix)
        if builder is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl, .json or .parquet)")
        if builder == "json":
            _validate_jsonl(path, field)
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:  # offline machines cannot reach the hub: say what was tried
            raise ValueError(f"text {spec!r} is neither a built-in ({', '.join(BUILTINS)}), a local file, nor a "
                             f"loadable dataset ({type(e).__name__}: {e})") from None
    if field not in ds.column_names:
        raise ValueError(f"{spec}: no column {field!r} (columns: {ds.column_names})")
    sep = "\n" if (path.exists() and builder == "text") else "\n\n"
    return sep.join(str(t) for t in ds[field] if t)


def _validate_jsonl(path: Path, field: str) -> None:
    """datasets' JSON errors do not name the line; check each line first so the error does."""
    from .jsonl import iter_jsonl

    for lineno, rec in iter_jsonl(path):
        if field not in rec:
            raise ValueError(f"{path}:{lineno}: missing field {field!r}")
