"""lm-evaluation-harness: the "longattn" model type on local tasks of every request type, offline."""
import json
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

import longattn  # noqa: E402
from longattn.evals.lmeval import LongattnLM, parse_assignments, parse_layers  # noqa: E402
from longattn.reference import reference_model_path  # noqa: E402

FACTS = [("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
         ("Two plus two equals", ["three", "four", "five"], 1),
         ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Fahrenheit"], 0),
         ("The largest planet of the solar system is", ["Mars", "Venus", "Jupiter"], 2),
         ("A week has seven", ["days", "hours", "years"], 0),
         ("The opposite of hot is", ["warm", "cold", "loud"], 1)]

SENTENCES = ["The file system keeps every block of a file in a tree of pages.",
             "A process that waits on a lock sleeps until the lock is released.",
             "The scheduler picks the next task from the queue with the earliest deadline.",
             "Memory that is mapped but never touched costs nothing until a page fault brings it in.",
             "Each network packet carries a header with its source and destination address."]


def _write_tasks(folder):
    """Three tasks, one per request type, with their data in local JSONL files (no hub access)."""
    mc = [{"question": q, "choices": c, "answer": a} for q, c, a in FACTS]
    docs = [{"text": " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(12))} for i in range(4)]
    keys = [31415, 27182, 16180, 14142]
    gen = [{"prompt": f"Remember this. The pass key is {k}. " + " ".join(SENTENCES) + " What is the pass key? "
                      f"The pass key is", "answer": str(k)} for k in keys]
    tasks = {
        "la_mc": (mc, "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                      "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "la_ppl": (docs, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                         "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                         "  - metric: bits_per_byte\n"),
        "la_gen": (gen, "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
                        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                        "filter_list:\n  - name: strip\n    filter:\n      - function: regex\n"
                        "        regex_pattern: \"(\\\\d+)\"\n      - function: take_first\n"
                        "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (rows, body) in tasks.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")
    return sorted(tasks)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    return folder, _write_tasks(folder)


def _evaluate(lm, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder, names = task_dir
    out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(folder)),
                          batch_size=2, log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                          fewshot_random_seed=0)
    return out["results"], out["samples"]


def _metrics(results):
    return {task: {k: v for k, v in r.items() if k != "alias"} for task, r in results.items()}


@pytest.fixture(scope="module")
def hf_results(task_dir):
    from lm_eval.models.huggingface import HFLM

    return _evaluate(HFLM(pretrained=str(reference_model_path()), device="cpu", dtype="float32"), task_dir)


def test_dense_equals_lm_evals_hf_model(task_dir, hf_results):
    lm = LongattnLM(pretrained="reference", patch="dense", device="cpu", dtype="float32")
    assert longattn.patch_state(lm.model).method.name == "dense"
    results, samples = _evaluate(lm, task_dir)
    assert _metrics(results) == _metrics(hf_results[0])  # exactly: same loader, same kernel
    for task in samples:
        assert [s["resps"] for s in samples[task]] == [s["resps"] for s in hf_results[1][task]]
    assert lm.density["prefill"] == 1.0 and lm.density["decode"] == 1.0


def test_sparse_method_changes_every_request_type(task_dir, hf_results):
    lm = LongattnLM(pretrained="reference", patch="sliding_window", patch_params="window=8", device="cpu",
                    dtype="float32")
    results, samples = _evaluate(lm, task_dir)
    dense = _metrics(hf_results[0])
    assert results["la_ppl"]["word_perplexity,none"] != dense["la_ppl"]["word_perplexity,none"]
    mc = [s["resps"] for s in samples["la_mc"]], [s["resps"] for s in hf_results[1]["la_mc"]]
    assert mc[0] != mc[1]  # the choices' log-likelihoods moved
    assert lm.density["prefill"] < 0.5 and lm.density["decode"] < 0.5  # generation ran through the window too


def test_kv_policy_bounds_generation_and_leaves_scoring_alone(task_dir, hf_results):
    lm = LongattnLM(pretrained="reference", patch="streaming_llm", patch_params="sink_tokens=4;kv_budget=24",
                    device="cpu", dtype="float32")
    seen = []

    def record(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if isinstance(cache, longattn.CompressedCache):
            seen.append(max(len(p) for p in cache.kept_positions(0)))

    handle = lm.model.register_forward_hook(record, with_kwargs=True)
    results, samples = _evaluate(lm, task_dir)
    handle.remove()
    assert seen and max(seen) <= 24  # every generate() step held the budget
    dense = _metrics(hf_results[0])
    for task in ("la_mc", "la_ppl"):  # no cache in scoring requests: the policy has nothing to act on
        assert _metrics(results)[task] == dense[task]


def test_model_args_parsing_and_errors():
    assert parse_assignments("sink_tokens=4;window=1020;backend=sdpa", "patch_params") == {
        "sink_tokens": 4, "window": 1020, "backend": "sdpa"}
    assert parse_assignments(None, "x") == {} and parse_layers("2:") == "2:" and parse_layers("0;3") == [0, 3]
    with pytest.raises(ValueError, match="patch_params expects NAME=VALUE"):
        parse_assignments("window", "patch_params")
    with pytest.raises(ValueError, match="window"):  # before loading anything
        LongattnLM(pretrained="/nonexistent", patch="sliding_window", patch_params="window=-3")
    with pytest.raises(ValueError, match="layers"):
        parse_layers("first")


def test_command_line(task_dir, tmp_path):
    """`longattn lm-eval` is lm-eval's CLI with the model type registered."""
    folder, _ = task_dir
    out = subprocess.run(
        [sys.executable, "-m", "longattn.cli", "lm-eval", "--model", "longattn", "--model_args",
         "pretrained=reference,patch=sink_window,patch_params=sink_tokens=2;window=30,dtype=float32",
         "--device", "cpu", "--tasks", "la_mc", "--include_path", str(folder), "--output_path", str(tmp_path / "res")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "la_mc" in out.stdout and "acc" in out.stdout
    written = list((tmp_path / "res").rglob("results_*.json"))
    assert written and "la_mc" in json.loads(written[0].read_text())["results"]
