"""Evaluation text through `datasets`: local text / JSONL / parquet files, a dataset name, or built-ins."""
from __future__ import annotations

from pathlib import Path

BUILTINS = ("licenses", "python-doc", "linux-doc-heldout")
LICENSES = Path("/usr/share/common-licenses")
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_text(spec: str, field: str = "text", split: str = "train") -> str:
    """One long string from `spec`.

    "licenses" (the licence texts every Debian system has in /usr/share/common-licenses, about 52k tokens of SmolLM2),
    "python-doc" (Python documentation prose, never seen by the reference model), "linux-doc-heldout" (the
    kernel documentation files held out of the reference model's training), a local .txt / .jsonl / .json /
    .parquet file (a .txt file as it is; records joined by blank lines, `field` naming the text column), or a
    `datasets` name.
    """
    if spec == "licenses":
        return licence_texts()
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
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl, .json or .parquet)")
        if builder == "text":  # the file as it is: datasets' text builder would drop its empty lines
            return path.read_text(encoding="utf-8", errors="replace")
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
    return "\n\n".join(str(t) for t in ds[field] if t)


def check_text_spec(spec: str) -> None:
    """Raise now for a text that cannot load: a missing file (named by a supported suffix) or an unsupported type.
    Built-ins and dataset names are taken as they are (a dataset name can only be checked by loading it)."""
    if spec in BUILTINS:
        return
    path = Path(spec)
    if path.suffix in FILE_BUILDERS and not path.is_file():
        raise FileNotFoundError(f"text {spec}: no such file")
    if path.exists() and path.suffix not in FILE_BUILDERS:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl, .json or .parquet)")


def _validate_jsonl(path: Path, field: str) -> None:
    """datasets' JSON errors do not name the line; check each line first so the error does."""
    from .jsonl import iter_jsonl

    for lineno, rec in iter_jsonl(path):
        if field not in rec:
            raise ValueError(f"{path}:{lineno}: missing field {field!r}")


def licence_texts(folder: Path = LICENSES) -> str:
    """The licence files of a Debian system (Apache-2.0, GPL-1..3, ...; not the aliases), joined by blank lines."""
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.is_symlink()) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"text 'licenses': no licence files in {folder} (a Debian or Ubuntu system has "
                                f"them); use another --text")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)
