"""The embedded reference model: a small Llama trained by scripts/train_reference_model.py, shipped in-package."""
from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "reference_model"


def reference_model_path() -> Path:
    if not (REFERENCE_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the reference model is not at {REFERENCE_DIR}; train it with "
            "`python scripts/train_reference_model.py --export longattn/reference_model`")
    return REFERENCE_DIR


def reference_model(dtype=None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of the shipped reference model, loaded offline on the CPU, in eval mode."""
    from .pretrained import load_model

    return load_model("reference", dtype=dtype or "float32", device="cpu", attn_implementation=attn_implementation)
