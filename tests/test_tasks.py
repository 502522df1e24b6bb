"""Every task generator: exact length, needles really present at the stated depth, seeds reproduce; metrics."""
import json

import pytest

from longattn.evals import make_task
from longattn.evals.metrics import exact_match, f1, first_number_match, string_match_all
from longattn.evals.tasks import Filler, build_haystack, load_longbench_jsonl

PROSE = " ".join(f"Line {i} of a long essay about attention, memory and time." for i in range(600))
SYNTHETIC = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
             "common_words", "kv_retrieval"]


@pytest.mark.parametrize("name", SYNTHETIC)
@pytest.mark.parametrize("length", [700, 2000])
def test_generators_hit_the_length_and_reproduce(small_tokenizer, name, length):
    task = make_task(name)
    a = task.make(small_tokenizer, length, seed=5)
    assert len(a.input_ids) == length
    assert a == task.make(small_tokenizer, length, seed=5)  # same seed, same sample
    assert a.input_ids != task.make(small_tokenizer, length, seed=6).input_ids
    assert a.answers and all(isinstance(x, str) and x for x in a.answers)
    text = small_tokenizer.decode(a.input_ids)
    for answer in a.answers:  # what is asked for really is in the context (common words: many times)
        assert answer in text


@pytest.mark.parametrize("name", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                                  "variable_tracking"])
@pytest.mark.parametrize("filler", [None, PROSE], ids=["grass", "prose"])
def test_needles_sit_at_their_depths(small_tokenizer, name, filler):
    s = make_task(name).make(small_tokenizer, 1500, seed=1, filler=Filler(filler), depth=0.3)
    spans, depths = s.meta["needle_spans"], s.meta["depths"]
    assert depths[0] == 0.3
    earlier = 0  # needle tokens placed before this one
    for i in sorted(range(len(spans)), key=lambda i: spans[i][0]):
        start, n = spans[i]
        assert start == s.meta["head_tokens"] + earlier + round(depths[i] * s.meta["filler_tokens"])
        earlier += n


def test_build_haystack_places_inserts_exactly(small_tokenizer):
    import random

    head, tail = [1, 2, 3], [4, 5]
    inserts = [[90, 91], [92], [93, 94, 95]]
    ids, starts, n_filler = build_haystack(small_tokenizer, 50, head, inserts, [0.5, 0.0, 1.0], tail, Filler(),
                                           random.Random(0))
    assert n_filler == 50 - 3 - 2 - 6
    assert len(ids) == 50 and ids[:3] == head and ids[-2:] == tail
    assert starts[1] == 3  # depth 0: right after the header
    assert starts[0] == 3 + 1 + round(0.5 * n_filler)  # after the depth-0 insert and half the filler
    assert starts[2] == 50 - 2 - 3  # depth 1: just before the question
    for s, ins in zip(starts, inserts):
        assert ids[s:s + len(ins)] == ins
    with pytest.raises(ValueError, match="too short"):
        build_haystack(small_tokenizer, 10, head, inserts, [0.1, 0.2, 0.3], tail, Filler(), random.Random(0))
    with pytest.raises(ValueError, match="one depth in"):
        build_haystack(small_tokenizer, 50, head, inserts, [0.1, 2.0, 0.3], tail, Filler(), random.Random(0))


def test_unknown_task_and_bad_parameters():
    with pytest.raises(ValueError, match=r"unknown task 'needle'.*available: \['common_words'"):
        make_task("needle")
    with pytest.raises(ValueError, match="variant must be one of"):
        make_task("niah_single", variant="x")
    with pytest.raises(ValueError, match="task passkey: bad parameters"):
        make_task("passkey", depthh=3)


def test_metrics():
    assert exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0
    assert f1("the tower in paris", ["Eiffel Tower, Paris"]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert f1("nothing", ["Eiffel"]) == 0.0
    assert string_match_all("values 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert first_number_match(" 12345. Remember", ["12345"]) == 1.0
    assert first_number_match(" 1234 5", ["12345"]) == 0.0


def test_longbench_loader_and_errors(tmp_path, small_tokenizer):
    good = tmp_path / "lb.jsonl"
    recs = [{"context": "Attention is memory. " * 200, "input": "What is attention?", "answers": ["memory"]},
            {"context": "Short context.", "input": "Q?", "answers": ["A", "B"], "dataset": "x"}]
    good.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    task = make_task("longbench", path=str(good))
    s = task.make(small_tokenizer, 300, seed=0)
    assert len(s.input_ids) == 300 and s.answers == ["memory"]  # truncated in the middle to the length
    assert small_tokenizer.decode(s.input_ids).endswith("Question: What is attention?\nAnswer:")
    assert task.make(small_tokenizer, 300, seed=1).answers == ["A", "B"]

    cases = {
        '{"context": "c", "input": "i", "answers": ["a"]}\n{"context": "c", "input": "i"\n': r"lb_bad.jsonl:2: not valid JSON",
        '{"context": "c", "answers": ["a"]}\n': r"lb_bad.jsonl:1: missing field 'input'",
        '{"context": "c", "input": "i", "answers": []}\n': r"lb_bad.jsonl:1: 'answers' must be a non-empty list",
        '[1, 2]\n': r"lb_bad.jsonl:1: expected a JSON object",
    }
    bad = tmp_path / "lb_bad.jsonl"
    for content, msg in cases.items():
        bad.write_text(content)
        with pytest.raises(ValueError, match=msg):
            load_longbench_jsonl(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_longbench_jsonl(tmp_path / "missing.jsonl")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="binary.jsonl: cannot read"):
        load_longbench_jsonl(binary)


@pytest.fixture
def bos_chat_tokenizer(small_tokenizer):
    """The small tokenizer made to add a BOS by itself (as Gemma's and Llama's do) and given a chat template."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(small_tokenizer)
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<user>", "<bot>"]})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.convert_tokens_to_ids("<bos>"))])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<user>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<bot>{% endif %}")
    return tok


ANSWER_LEAD_IN = {"passkey": "The pass key is", "niah_single": "is:", "niah_multikey": "is:",
                  "niah_multivalue": "are:", "niah_multiquery": "are:", "variable_tracking": "they are:",
                  "common_words": "list are:", "kv_retrieval": 'key is: "'}


@pytest.mark.parametrize("name", SYNTHETIC)
def test_prompts_framed_with_bos_or_chat_template_keep_their_length(bos_chat_tokenizer, small_tokenizer, name):
    from longattn.evals.tasks.base import PromptFormat, bos_ids

    tok = bos_chat_tokenizer
    bos, user, bot = (tok.convert_tokens_to_ids(t) for t in ("<bos>", "<user>", "<bot>"))
    assert bos_ids(tok) == [bos] and bos_ids(small_tokenizer) == []  # only where the tokenizer adds one
    raw = make_task(name).make(tok, 700, seed=2, depth=0.5)
    chat = make_task(name).make(tok, 700, seed=2, depth=0.5, prompt=PromptFormat(chat=True))
    assert len(raw.input_ids) == len(chat.input_ids) == 700
    assert raw.input_ids[0] == bos and user not in raw.input_ids  # raw text, led by BOS
    assert chat.input_ids[:2] == [bos, user] and chat.input_ids.count(bot) == 1
    reply = tok.decode(chat.input_ids[chat.input_ids.index(bot) + 1:])
    assert reply.endswith(ANSWER_LEAD_IN[name]) and not reply.startswith(" ")  # the answer's lead-in opens it
    assert tok.decode(raw.input_ids).endswith(ANSWER_LEAD_IN[name])
    assert raw.answers == chat.answers
    if "needle_spans" in raw.meta:
        (a, n), (b, m) = chat.meta["needle_spans"][0], raw.meta["needle_spans"][0]
        assert chat.input_ids[a:a + n] == raw.input_ids[b:b + m]  # the same needle, where the meta says it is


def test_chat_without_a_template_is_an_error(small_tokenizer):
    from longattn.evals.tasks.base import PromptFormat

    with pytest.raises(ValueError, match="chat prompts need a tokenizer with a chat template"):
        make_task("passkey").make(small_tokenizer, 300, seed=0, prompt=PromptFormat(chat=True))


def test_kv_retrieval_reports_where_the_asked_pair_sits(small_tokenizer):
    s = make_task("kv_retrieval").make(small_tokenizer, 700, seed=1, depth=0.5)
    (depth,) = s.meta["depths"]
    assert depth == s.meta["depth_index"] / (s.meta["pairs"] - 1) and 0.4 <= depth <= 0.6
