"""Every causal-LM architecture of the installed transformers: patched exactly, or refused with a clear error.

Each architecture's tiny random model (longattn/models/tiny.py) runs the four checks of longattn/models/compat.py
(dense parity + bit-identical unpatch, sink_window vs an explicit-mask reference, left-padded generate, a snapkv
budget). A check may pass or raise UnsupportedModelError naming its reason; it may never give a wrong result or
crash. scripts/compatibility.py runs the same matrix and writes the table.
"""
import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from longattn.models.compat import CHECKS, run_checks

# Architectures that must pass all four checks: the ones each fix of the compatibility work is about, so a
# regression shows as a failure here and not only as a lower count in the table.
MUST_PASS = ("llama", "mistral", "gemma2", "gemma3_text", "qwen3", "opt", "bart", "gpt_oss", "granite_swa",
             "flint", "mimo_v2_flash", "qwen3_next", "qwen3_5_text", "jamba", "granitemoehybrid", "nemotron_h",
             "lfm2_moe", "olmo_hybrid", "bamba", "gpt2", "phi3",
             # latent (MLA) caches, DeepSeek sparse attention, hybrid cache layers, shared attention blocks, KV
             # sharing between layers, KV heads tiled per expert, codebook LMs, a cache class of its own, recurrent
             # stacks, an audio encoder beside the decoder, a cache generate copies
             "deepseek_v2", "deepseek_v3", "kimi_linear", "deepseek_v32", "glm_moe_dsa", "falcon_h1", "zaya",
             "zamba", "zamba2", "gemma3n_text", "gemma4_text", "jetmoe", "musicgen", "hy_v4", "minimax",
             "hrm_text", "moss_transcribe_diarize", "dory")
# Architectures no tiny model can stand for alone, and the words of the reason.
NO_TINY_MODEL = {"gemma3n": "timm", "gemma4_assistant": "hidden_size_per_layer_input",
                 "gemma4_unified_assistant": "shared_kv_states"}
MIN_PASSING = 158  # measured with transformers 5.24 (evals/results/compatibility.md)

_results: dict = {}


def results_for(model_type: str) -> dict:
    if model_type not in _results:
        torch.manual_seed(0)
        _results[model_type] = run_checks(model_type)
    return _results[model_type]


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_exact_or_clearly_refused(model_type):
    res = results_for(model_type)
    if "build" in res:  # only these may lack a tiny model, each for the reason given
        assert model_type in NO_TINY_MODEL, res["build"]
        assert NO_TINY_MODEL[model_type] in res["build"], res["build"]
        return
    assert set(res) == set(CHECKS)
    failed = {k: v for k, v in res.items() if not (v == "pass" or v.startswith(("refused: ", "n/a: ")))}
    assert not failed, failed
    if model_type in MUST_PASS:
        assert all(v == "pass" for v in res.values()), res


def test_enough_architectures_pass_everything():
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        results_for(mt)
    built = [r for r in _results.values() if "build" not in r]
    passing = [r for r in built if all(v == "pass" for v in r.values())]
    assert len(passing) >= MIN_PASSING, f"{len(passing)} of {len(built)} built architectures pass all checks"
