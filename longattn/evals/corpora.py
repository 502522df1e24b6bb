"""Offline English text from Debian documentation packages (fetched with `apt-get download`, cached).

linux-doc-6.1: the Linux kernel's Documentation/ (reStructuredText, GPL-2.0) — the reference model's
training text, with a held-out split. python3.11-doc: the Python documentation sources (PSF licence) — prose
the reference model never saw.
"""
from __future__ import annotations

import gzip
import subprocess
import tempfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "longattn"


def debian_package_root(package: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Download and unpack a Debian package into the cache (once); returns the unpacked root."""
    root = Path(cache) / package
    if (root / "SOURCE").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", package]
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (has `apt-get update` been run?):\n{res.stderr}")
        deb = next(Path(tmp).glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        (root / "SOURCE").write_text(deb.name + "\n")
    return root


def read_text_file(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        return f.read()


def python_doc_prose(cache: Path = DEFAULT_CACHE, sections=("tutorial", "howto", "faq")) -> str:
    """Python 3.11 documentation sources of the given sections, concatenated (about 1 MB of prose)."""
    root = debian_package_root("python3.11-doc", cache)
    src = next(root.glob("usr/share/doc/python3.11/html/_sources"))
    files = sorted(p for s in sections for p in (src / s).rglob("*.rst.txt"))
    return "\n\n".join(read_text_file(p).strip() for p in files)


def linux_doc_split(cache: Path = DEFAULT_CACHE, every: int = 50) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of linux-doc-6.1's Documentation/**/*.rst: one file in `every`, chosen by
    the SHA-1 of its relative path, is held out (the reference model never trained on it)."""
    import hashlib

    root = debian_package_root("linux-doc-6.1", cache)
    docs = next(root.glob("usr/share/doc/linux-doc-*/Documentation"))
    files = sorted(p for p in docs.rglob("*") if p.name.endswith((".rst", ".rst.gz")))
    train, held = [], []
    for p in files:
        bucket = int(hashlib.sha1(str(p.relative_to(docs)).encode()).hexdigest(), 16) % every
        (held if bucket == 0 else train).append(read_text_file(p).strip())
    return train, held


def linux_doc_heldout(cache: Path = DEFAULT_CACHE) -> str:
    """The linux-doc files held out of the reference model's training, joined by blank lines."""
    return "\n\n".join(linux_doc_split(cache)[1])
